//! Duplicates (same sender and `message_id`) apply nothing twice and repeat the first outcome
//! (CONTRACT.md §4); stable outbound ids.

use crate::{GP, World, assert_reply, count, trajet};
use std::time::Duration;
use trio_gateway::partner::Outgoing;
use trio_tests::{WAIT, request_with_id};

#[tokio::test]
async fn a_duplicate_repeats_the_first_outcome_and_applies_nothing() {
    let mut w = World::new(50).await;
    let mut to_gp = w.gp.listen(&format!("gp.{GP}")).await.unwrap();
    let body = trajet(&w.niss, "d", "rtw_ami", "en_cours", 1);
    let first = request_with_id(&mut w.oa, "oa", "trajet.upsert", "dup-1", &body).await;
    assert_reply(&first, "accepted", None);
    let second = request_with_id(&mut w.oa, "oa", "trajet.upsert", "dup-1", &body).await;
    assert_eq!(second.body["status"], "duplicate");
    assert_eq!(second.body["detail"], "accepted");
    assert_eq!(second.body["result"], first.body["result"]);
    assert_ne!(first.message_id, second.message_id);
    assert_eq!(count(&w.env, "trajet").await, 1);
    assert_eq!(
        count(&w.env, "inbox").await,
        7 + 1,
        "3 orgs + 4 relations + 1 upsert"
    );
    let events = to_gp.drain(Duration::from_secs(2)).await.unwrap();
    assert_eq!(events.len(), 1, "no second event");

    // a rejected message's duplicate repeats the rejection code
    let bad = trajet(&w.niss, "d", "rtw_ami", "accepte", 9);
    let a = request_with_id(&mut w.oa, "oa", "trajet.upsert", "dup-2", &bad).await;
    let b = request_with_id(&mut w.oa, "oa", "trajet.upsert", "dup-2", &bad).await;
    assert_reply(&a, "rejected", Some("status_not_allowed"));
    assert_eq!(b.body["status"], "duplicate");
    assert_eq!(b.body["code"], "status_not_allowed");
    assert_eq!(b.body["detail"], "rejected");
    w.env.finish().await;
}

#[tokio::test]
async fn duplicates_within_one_batch_are_absorbed_too() {
    let mut w = World::new(51).await;
    let body = trajet(&w.niss, "b", "rtw_ami", "en_cours", 1)
        .to_string()
        .into_bytes();
    let messages: Vec<Outgoing> = (0..5)
        .map(|_| Outgoing {
            queue: "oa",
            message_type: "trajet.upsert",
            message_id: "same-id",
            content_type: "application/json",
            body: body.clone(),
            want_reply: true,
        })
        .collect();
    w.oa.publish_many(&messages).await.unwrap();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = w.oa.next_reply(WAIT).await.unwrap().expect("a reply");
        statuses.push(r.body["status"].as_str().unwrap().to_owned());
    }
    statuses.sort();
    assert_eq!(
        statuses,
        [
            "accepted",
            "duplicate",
            "duplicate",
            "duplicate",
            "duplicate"
        ]
    );
    assert_eq!(count(&w.env, "trajet").await, 1);
    w.env.finish().await;
}

#[tokio::test]
async fn the_same_message_id_from_another_sender_is_another_message() {
    let mut w = World::new(52).await;
    let a = request_with_id(
        &mut w.oa,
        "oa",
        "dossier.open",
        "shared-id",
        &serde_json::json!({"niss": w.niss}),
    )
    .await;
    let b = request_with_id(
        &mut w.gp,
        "gp",
        "dossier.open",
        "shared-id",
        &serde_json::json!({"niss": w.niss}),
    )
    .await;
    assert_reply(&a, "accepted", None);
    assert_reply(&b, "accepted", None);
    w.env.finish().await;
}
