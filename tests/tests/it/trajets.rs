//! `trajet.upsert` rules (DOMAIN.md §2.2, §4.3; CONTRACT.md §3) and the `trajet.updated`
//! fan-out (CONTRACT.md §4).

use crate::{GP, OA, SEPP, World, assert_reply, count, trajet};
use serde_json::{Value, json};
use std::time::Duration;
use trio_tests::request;

#[tokio::test]
async fn who_may_create_which_trajet_type() {
    let mut w = World::new(20).await;
    let n = w.niss.clone();
    let r = request(
        &mut w.sepp,
        "sepp",
        "trajet.upsert",
        &trajet(&n, "s1", "rtw_ami", "en_cours", 1),
    )
    .await;
    assert_reply(&r, "rejected", Some("forbidden"));
    for t in [
        "reintegration_codex",
        "force_majeure_medicale",
        "visite_pre_reprise",
    ] {
        let r = request(
            &mut w.oa,
            "oa",
            "trajet.upsert",
            &trajet(&n, "o1", t, "en_cours", 1),
        )
        .await;
        assert_reply(&r, "rejected", Some("forbidden"));
        let r = request(
            &mut w.sepp,
            "sepp",
            "trajet.upsert",
            &trajet(&n, t, t, "en_cours", 1),
        )
        .await;
        assert_reply(&r, "accepted", None);
    }
    let r = request(
        &mut w.gp,
        "gp",
        "trajet.upsert",
        &trajet(&n, "g1", "rtw_ami", "en_cours", 1),
    )
    .await;
    assert_reply(&r, "rejected", Some("forbidden"));
    let r = request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&n, "o2", "rtw_ami", "en_cours", 1),
    )
    .await;
    assert_reply(&r, "accepted", None);
    assert_eq!(r.body["result"]["created"], true);
    assert_eq!(count(&w.env, "trajet").await, 4);
    w.env.finish().await;
}

#[tokio::test]
async fn statuses_belong_to_their_type_and_any_may_follow_any() {
    let mut w = World::new(21).await;
    let n = w.niss.clone();
    let r = request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&n, "t", "rtw_ami", "accepte", 1),
    )
    .await;
    assert_reply(&r, "rejected", Some("status_not_allowed"));
    let r = request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&n, "t", "rtw_ami", "nonsense", 1),
    )
    .await;
    assert_reply(&r, "rejected", Some("status_not_allowed"));
    assert_eq!(count(&w.env, "trajet").await, 0);
    // terminal → open again is allowed (DOMAIN.md §12 #2)
    for (v, s) in [
        (1, "termine"),
        (2, "en_cours"),
        (3, "contact_medecin_travail"),
    ] {
        let r = request(
            &mut w.oa,
            "oa",
            "trajet.upsert",
            &trajet(&n, "t", "rtw_ami", s, v),
        )
        .await;
        assert_reply(&r, "accepted", None);
    }
    let status: String = sqlx::query_scalar("SELECT status FROM trajet")
        .fetch_one(&w.env.db)
        .await
        .unwrap();
    assert_eq!(status, "contact_medecin_travail");
    w.env.finish().await;
}

#[tokio::test]
async fn versions_order_updates_and_the_type_never_changes() {
    let mut w = World::new(22).await;
    let n = w.niss.clone();
    let r = request(
        &mut w.sepp,
        "sepp",
        "trajet.upsert",
        &trajet(&n, "c", "reintegration_codex", "en_cours", 5),
    )
    .await;
    assert_reply(&r, "accepted", None);
    for v in [5, 4] {
        let r = request(
            &mut w.sepp,
            "sepp",
            "trajet.upsert",
            &trajet(&n, "c", "reintegration_codex", "accepte", v),
        )
        .await;
        assert_reply(&r, "stale", None);
    }
    let r = request(
        &mut w.sepp,
        "sepp",
        "trajet.upsert",
        &trajet(&n, "c", "visite_pre_reprise", "termine", 6),
    )
    .await;
    assert_reply(&r, "rejected", Some("invalid_transition"));
    let (status, version, t): (String, i64, String) =
        sqlx::query_as("SELECT status, version, type FROM trajet")
            .fetch_one(&w.env.db)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), version, t.as_str()),
        ("en_cours", 5, "reintegration_codex")
    );
    let r = request(
        &mut w.sepp,
        "sepp",
        "trajet.upsert",
        &trajet(&n, "c", "reintegration_codex", "accepte", 6),
    )
    .await;
    assert_reply(&r, "accepted", None);
    assert_eq!(r.body["result"]["created"], false);
    w.env.finish().await;
}

#[tokio::test]
async fn invalid_payloads_are_rejected_with_nothing_written() {
    let mut w = World::new(23).await;
    let n = w.niss.clone();
    let cases = [
        trajet(&n, "x", "rtw_ami", "en_cours", 0),
        trajet(&n, "", "rtw_ami", "en_cours", 1),
        trajet(&n, &"r".repeat(65), "rtw_ami", "en_cours", 1),
        json!({"niss": n, "trajet": {"ref": "x", "type": "rtw_ami", "status": "en_cours", "version": 1, "start_on": "2200-01-01"}}),
        json!({"niss": n, "trajet": {"ref": "x", "type": "unknown_type", "status": "en_cours", "version": 1}}),
        json!({"niss": n}),
    ];
    for body in cases {
        let r = request(&mut w.oa, "oa", "trajet.upsert", &body).await;
        assert_reply(&r, "rejected", Some("invalid_payload"));
    }
    assert_eq!(count(&w.env, "trajet").await, 0);
    assert_eq!(count(&w.env, "dossier").await, 0);
    w.env.finish().await;
}

fn body(d: &lapin::message::Delivery) -> String {
    String::from_utf8_lossy(&d.data).into_owned()
}

#[tokio::test]
async fn trajet_updated_goes_once_to_every_other_related_actor_in_its_format() {
    let mut w = World::new(24).await;
    let mut to_oa = w.oa.listen(&format!("oa.{OA}")).await.unwrap();
    let mut to_sepp = w.sepp.listen(&format!("sepp.{SEPP}")).await.unwrap();
    let mut to_gp = w.gp.listen(&format!("gp.{GP}")).await.unwrap();
    let n = w.niss.clone();
    let r = request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&n, "rtw-1", "rtw_ami", "en_cours", 1),
    )
    .await;
    assert_reply(&r, "accepted", None);
    let pseudonym = r.body["result"]["pseudonym"].as_str().unwrap().to_owned();
    assert!(
        pseudonym.contains(':'),
        "in-transit form is point:transitInfo"
    );

    let quiet = Duration::from_secs(2);
    let gp_got = to_gp.drain(quiet).await.unwrap();
    let sepp_got = to_sepp.drain(quiet).await.unwrap();
    let oa_got = to_oa.drain(quiet).await.unwrap();
    assert_eq!(gp_got.len(), 1, "one message for the GP");
    assert_eq!(sepp_got.len(), 1, "one message for the SEPP");
    assert!(oa_got.is_empty(), "the sender gets no event");

    let g = &gp_got[0];
    assert_eq!(
        g.properties.kind().as_ref().unwrap().as_str(),
        "trajet.updated"
    );
    assert_eq!(
        g.properties.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(g.properties.delivery_mode(), &Some(2));
    let v: Value = serde_json::from_slice(&g.data).unwrap();
    assert_eq!(v["trajet"]["owner"], json!({"kind": "oa", "id": OA}));
    assert_eq!(v["trajet"]["ref"], "rtw-1");
    assert_eq!(v["trajet"]["status"], "en_cours");
    assert_eq!(v["trajet"]["start_on"], "2026-11-02");
    assert_eq!(v["dossier_number"], r.body["result"]["dossier_number"]);
    assert!(v["pseudonym"].as_str().unwrap().contains(':'));

    let s = &sepp_got[0];
    assert_eq!(
        s.properties.content_type().as_ref().unwrap().as_str(),
        "application/xml"
    );
    let xml = body(s);
    assert!(
        xml.contains("<trajet_updated xmlns=\"urn:be:trio:gateway:v1\""),
        "{xml}"
    );
    assert!(xml.contains("<status>en_cours</status>"), "{xml}");
    assert_ne!(
        g.properties.message_id(),
        s.properties.message_id(),
        "a different message_id per recipient"
    );
    w.env.finish().await;
}

#[tokio::test]
async fn once_consent_is_withdrawn_events_carry_no_dates() {
    let mut w = World::new(25).await;
    let mut to_gp = w.gp.listen(&format!("gp.{GP}")).await.unwrap();
    let n = w.niss.clone();
    let mut body = trajet(&n, "c1", "reintegration_codex", "en_cours", 1);
    body["trajet"]["consent"] = json!("withdrawn");
    let r = request(&mut w.sepp, "sepp", "trajet.upsert", &body).await;
    assert_reply(&r, "accepted", None);
    let got = to_gp.drain(Duration::from_secs(2)).await.unwrap();
    assert_eq!(got.len(), 1);
    let v: Value = serde_json::from_slice(&got[0].data).unwrap();
    let keys: Vec<&str> = v["trajet"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut keys = keys;
    keys.sort_unstable();
    assert_eq!(keys, ["owner", "ref", "status", "type", "version"]);
    w.env.finish().await;
}

#[tokio::test]
async fn rejected_and_stale_updates_publish_no_event() {
    let mut w = World::new(26).await;
    let mut to_gp = w.gp.listen(&format!("gp.{GP}")).await.unwrap();
    let n = w.niss.clone();
    let r = request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&n, "t", "rtw_ami", "en_cours", 2),
    )
    .await;
    assert_reply(&r, "accepted", None);
    let r = request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&n, "t", "rtw_ami", "termine", 1),
    )
    .await;
    assert_reply(&r, "stale", None);
    let r = request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&n, "t", "rtw_ami", "accepte", 3),
    )
    .await;
    assert_reply(&r, "rejected", Some("status_not_allowed"));
    let got = to_gp.drain(Duration::from_secs(2)).await.unwrap();
    assert_eq!(got.len(), 1, "only the accepted update is published");
    w.env.finish().await;
}

#[tokio::test]
async fn history_records_dossier_and_trajet_changes_without_niss() {
    let mut w = World::new(27).await;
    let n = w.niss.clone();
    request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&n, "t", "rtw_ami", "en_cours", 1),
    )
    .await;
    request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&n, "t", "rtw_ami", "termine", 2),
    )
    .await;
    let ops: Vec<(String, String)> =
        sqlx::query_as("SELECT resource, operation FROM history ORDER BY id")
            .fetch_all(&w.env.db)
            .await
            .unwrap();
    assert_eq!(
        ops,
        [
            ("dossier_trio".to_owned(), "dossier_created".to_owned()),
            ("trajet_rtw_ami".to_owned(), "trajet_created".to_owned()),
            ("trajet_rtw_ami".to_owned(), "trajet_updated".to_owned()),
        ]
    );
    w.env.finish().await;
}

#[tokio::test]
async fn a_trajet_ref_belongs_to_one_insured_across_batches() {
    // The ref "r" is the OA's trajet of the first insured; the same OA using it again for a
    // second insured, in a later batch, is refused and moves nothing.
    let mut w = World::new(40).await;
    let first = w.niss.clone();
    let second = trio_gateway::partner::synthetic_niss(41);
    w.env
        .relate(
            &mut w.operator,
            json!({"kind": "insured_oa", "niss": second, "oa": OA}),
        )
        .await;
    let r = request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&first, "r", "rtw_ami", "en_cours", 1),
    )
    .await;
    assert_reply(&r, "accepted", None);
    let owner: i64 = sqlx::query_scalar("SELECT dossier_id FROM trajet WHERE ref = 'r'")
        .fetch_one(&w.env.db)
        .await
        .unwrap();

    let r = request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&second, "r", "rtw_ami", "termine", 2),
    )
    .await;
    assert_reply(&r, "rejected", Some("invalid_payload"));
    let (dossier, status, version): (i64, String, i64) =
        sqlx::query_as("SELECT dossier_id, status, version FROM trajet WHERE ref = 'r'")
            .fetch_one(&w.env.db)
            .await
            .unwrap();
    assert_eq!((dossier, status.as_str(), version), (owner, "en_cours", 1));
    w.env.finish().await;
}
