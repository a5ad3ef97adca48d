//! Unreadable messages go to `trio.dead` with `x-trio-error`, body unchanged, and never block
//! the queue (CONTRACT.md §5); with a `message_id` and `reply_to` a `rejected` reply goes too.

use crate::{World, assert_reply};
use lapin::BasicProperties;
use serde_json::json;
use std::time::Duration;
use trio_gateway::partner::header;
use trio_tests::request;

#[tokio::test]
async fn unreadable_messages_are_dead_lettered_with_their_reason_and_the_queue_goes_on() {
    let mut w = World::new(40).await;
    let mut dead = w.operator.consume_queue("trio.dead").await.unwrap();
    let json = |id: &str, t: &str| w.gp.properties(t, id);
    let cases: Vec<(&str, BasicProperties, Vec<u8>, &str)> = vec![
        ("bad-json", json("bad-json", "dossier.open"), b"{not json".to_vec(), "unreadable"),
        ("bad-utf8", json("bad-utf8", "dossier.open"), vec![0xff, 0xfe, 0x00], "unreadable"),
        (
            "bad-ct",
            json("bad-ct", "dossier.open").with_content_type("text/plain".into()),
            b"{}".to_vec(),
            "unreadable",
        ),
        ("unknown-type", json("unknown-type", "dossier.frobnicate"), b"{}".to_vec(), "unknown_type"),
        ("too-large", json("too-large", "dossier.open"), vec![b' '; 1024 * 1024 + 1], "too_large"),
        (
            "dtd",
            json("dtd", "dossier.open").with_content_type("application/xml".into()),
            b"<?xml version=\"1.0\"?><!DOCTYPE x [<!ENTITY e \"x\">]><dossier_open xmlns=\"urn:be:trio:gateway:v1\"><niss>&e;</niss></dossier_open>".to_vec(),
            "dtd_refused",
        ),
        (
            "",
            BasicProperties::default()
                .with_type("dossier.open".into())
                .with_content_type("application/json".into())
                .with_user_id(w.gp.user().into()),
            b"{}".to_vec(),
            "no_message_id",
        ),
    ];
    for (_, props, body, _) in &cases {
        w.gp.publish_raw("gp", props.clone(), body).await.unwrap();
    }
    // the queue is not blocked: a good message after them is processed
    w.gp.publish(&trio_gateway::partner::Outgoing::json(
        "gp",
        "dossier.open",
        "good",
        &json!({"niss": w.niss}),
    ))
    .await
    .unwrap();
    let mut replies = std::collections::HashMap::new();
    while replies.len() < cases.len() {
        let r =
            w.gp.next_reply(trio_tests::WAIT)
                .await
                .unwrap()
                .expect("a reply for each answerable message");
        replies.insert(r.correlation_id.clone(), r);
    }
    assert_reply(&replies["good"], "accepted", None);

    let letters = dead.drain(Duration::from_secs(3)).await.unwrap();
    assert_eq!(
        letters.len(),
        cases.len(),
        "every unreadable message is dead-lettered once"
    );
    for (id, props, body, reason) in &cases {
        let letter = letters
            .iter()
            .find(|l| {
                l.properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.as_str())
                    .unwrap_or("")
                    == *id
            })
            .unwrap_or_else(|| panic!("no dead letter for {id:?}"));
        assert_eq!(
            header(letter, "x-trio-error").as_deref(),
            Some(*reason),
            "{id}"
        );
        assert_eq!(&letter.data, body, "body unchanged for {id}");
        assert_eq!(letter.properties.kind(), props.kind());
        assert_eq!(letter.properties.user_id(), props.user_id());
    }
    // answerable ones got a rejected reply with the same code
    for (id, _, _, reason) in cases.iter().filter(|c| !c.0.is_empty()) {
        assert_reply(&replies[*id], "rejected", Some(reason));
    }
    w.env.finish().await;
}

#[tokio::test]
async fn known_but_unsupported_types_are_dead_lettered_for_later_replay() {
    let mut w = World::new(41).await;
    let mut dead = w.operator.consume_queue("trio.dead").await.unwrap();
    let r = request(&mut w.gp, "gp", "annex.add", &json!({"niss": w.niss})).await;
    assert_reply(&r, "rejected", Some("unknown_type"));
    let letters = dead.drain(Duration::from_secs(2)).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(
        header(&letters[0], "x-trio-error").as_deref(),
        Some("unknown_type")
    );
    assert_eq!(header(&letters[0], "x-trio-queue").as_deref(), Some("gp"));
    w.env.finish().await;
}
