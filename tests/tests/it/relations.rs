//! NISS replacement (CONTRACT.md §3 `niss_replaced`) and organisation registration.

use crate::{World, assert_reply, count, hold_insured_lock, trajet};
use serde_json::json;
use trio_tests::{WAIT, request, send, synthetic_niss};

#[tokio::test]
async fn niss_replacement_moves_the_dossier_to_the_new_niss() {
    let mut w = World::new(30).await;
    let old = w.niss.clone();
    let new = synthetic_niss(30_030);
    let r = request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&old, "t", "rtw_ami", "en_cours", 1),
    )
    .await;
    let number = r.body["result"]["dossier_number"].clone();
    w.env
        .relate(
            &mut w.operator,
            json!({"kind": "niss_replaced", "old_niss": old, "new_niss": new}),
        )
        .await;
    // relations moved with it: the OA reaches the dossier through the new NISS
    let r = request(&mut w.oa, "oa", "dossier.open", &json!({"niss": new})).await;
    assert_reply(&r, "accepted", None);
    assert_eq!(r.body["result"]["dossier_number"], number);
    assert_eq!(r.body["result"]["created"], false);
    // and a message still using the old NISS lands on the same dossier
    let r = request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&old, "t", "rtw_ami", "termine", 2),
    )
    .await;
    assert_reply(&r, "accepted", None);
    assert_eq!(r.body["result"]["dossier_number"], number);
    // a replacement cannot be undone
    let r = request(
        &mut w.operator,
        "reference",
        "relation.unset",
        &json!({"relation": {"kind": "niss_replaced", "old_niss": old, "new_niss": new}}),
    )
    .await;
    assert_reply(&r, "rejected", Some("invalid_payload"));
    w.env.finish().await;
}

#[tokio::test]
async fn niss_replacement_merges_two_dossiers() {
    let mut w = World::new(31).await;
    let old = w.niss.clone();
    let new = synthetic_niss(31_031);
    w.env
        .relate(
            &mut w.operator,
            json!({"kind": "insured_oa", "niss": new, "oa": crate::OA}),
        )
        .await;
    let a = request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&old, "a", "rtw_ami", "en_cours", 1),
    )
    .await;
    let b = request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&new, "b", "rtw_ami", "en_cours", 1),
    )
    .await;
    assert_ne!(
        a.body["result"]["dossier_number"],
        b.body["result"]["dossier_number"]
    );
    w.env
        .relate(
            &mut w.operator,
            json!({"kind": "niss_replaced", "old_niss": old, "new_niss": new}),
        )
        .await;
    let trajets_in_new: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM trajet t JOIN dossier d ON d.id = t.dossier_id WHERE d.number = $1",
    )
    .bind(b.body["result"]["dossier_number"].as_str().unwrap())
    .fetch_one(&w.env.db)
    .await
    .unwrap();
    assert_eq!(
        trajets_in_new, 2,
        "the old dossier's trajet joined the new one"
    );
    let merged: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dossier WHERE merged_into IS NOT NULL")
            .fetch_one(&w.env.db)
            .await
            .unwrap();
    assert_eq!(merged, 1);
    w.env.finish().await;
}

#[tokio::test]
async fn organisation_upsert_updates_and_guards_broker_users() {
    let mut w = World::new(32).await;
    // the same broker user cannot belong to two organisations
    let r = request(&mut w.operator, "reference", "organisation.upsert",
        &json!({"id": "500", "kind": "oa", "name": "Other", "broker_user": "t-oa-300", "format": "json"})).await;
    assert_reply(&r, "rejected", Some("invalid_payload"));
    // the OA switches to XML
    let r = request(&mut w.operator, "reference", "organisation.upsert",
        &json!({"id": crate::OA, "kind": "oa", "name": "Renamed", "broker_user": "t-oa-300", "format": "xml"})).await;
    assert_reply(&r, "accepted", None);
    let (name, format): (String, String) =
        sqlx::query_as("SELECT name, format FROM organisation WHERE kind = 'oa'")
            .fetch_one(&w.env.db)
            .await
            .unwrap();
    assert_eq!((name.as_str(), format.as_str()), ("Renamed", "xml"));
    assert_eq!(count(&w.env, "organisation").await, 3);
    w.env.finish().await;
}

#[tokio::test]
async fn a_message_on_a_replaced_niss_reads_its_successor_under_the_successors_lock() {
    // A message naming a replaced NISS resolves to the successor, whose lock the batch can take
    // only once its load found the replacement. A transaction holding that lock (another batch,
    // on the successor) records the insured's death meanwhile: the message must see it.
    let mut w = World::new(33).await;
    let old = w.niss.clone();
    let new = synthetic_niss(33_033);
    let first = request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&old, "t", "rtw_ami", "en_cours", 1),
    )
    .await;
    assert_reply(&first, "accepted", None);
    w.env
        .relate(
            &mut w.operator,
            json!({"kind": "niss_replaced", "old_niss": old, "new_niss": new}),
        )
        .await;
    // the dossier moved to the successor: its insured is the successor now
    let (mut other_batch, successor) = hold_insured_lock(
        &w.env,
        first.body["result"]["dossier_number"].as_str().unwrap(),
    )
    .await;
    let message_id = send(
        &w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&old, "t", "rtw_ami", "termine", 2),
    )
    .await;
    // the gateway's batch has loaded and now waits for the successor's lock
    let mut waiting = false;
    for _ in 0..200 {
        waiting = sqlx::query_scalar(
            "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        )
        .fetch_one(&w.env.db)
        .await
        .unwrap();
        if waiting {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(waiting, "the batch never waited for the successor's lock");
    sqlx::query(
        "INSERT INTO insured (pseudonym, died_on) VALUES ($1, '2026-11-01') \
                 ON CONFLICT (pseudonym) DO UPDATE SET died_on = EXCLUDED.died_on",
    )
    .bind(&successor)
    .execute(&mut *other_batch)
    .await
    .unwrap();
    other_batch.commit().await.unwrap();

    let r = w.oa.reply_to(&message_id, WAIT).await.unwrap();
    assert_reply(&r, "rejected", Some("deceased"));
    let version: i64 = sqlx::query_scalar("SELECT version FROM trajet WHERE ref = 't'")
        .fetch_one(&w.env.db)
        .await
        .unwrap();
    assert_eq!(version, 1, "nothing applied for a deceased insured");
    w.env.finish().await;
}
