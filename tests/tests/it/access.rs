//! Sender authentication (CONTRACT.md §2) and dossier access (DOMAIN.md §2.1, §12 #1, #26).

use crate::{GP, OA, World, assert_reply, count};
use serde_json::json;
use trio_gateway::partner::Outgoing;
use trio_tests::{TestEnv, request, synthetic_niss};

#[tokio::test]
async fn unknown_broker_user_is_unauthenticated_and_nothing_is_written() {
    let env = TestEnv::start().await;
    let mut stranger = env.broker_user("t-stranger").await;
    let reply = request(
        &mut stranger,
        "oa",
        "dossier.open",
        &json!({"niss": synthetic_niss(1)}),
    )
    .await;
    assert_reply(&reply, "rejected", Some("unauthenticated"));
    assert_eq!(count(&env, "dossier").await, 0);
    env.finish().await;
}

#[tokio::test]
async fn a_message_without_user_id_is_unauthenticated() {
    let w = World::new(2).await;
    let props = w.oa.properties("dossier.open", "no-user-id");
    // Same properties without user_id.
    let props = lapin::BasicProperties::default()
        .with_message_id("no-user-id".into())
        .with_type("dossier.open".into())
        .with_content_type("application/json".into())
        .with_reply_to(props.reply_to().clone().unwrap_or_default());
    let mut oa = w.oa;
    oa.publish_raw("oa", props, json!({"niss": w.niss}).to_string().as_bytes())
        .await
        .unwrap();
    let reply = oa.reply_to("no-user-id", trio_tests::WAIT).await.unwrap();
    assert_reply(&reply, "rejected", Some("unauthenticated"));
    assert_eq!(count(&w.env, "dossier").await, 0);
    w.env.finish().await;
}

#[tokio::test]
async fn an_organisation_on_another_kinds_queue_is_forbidden() {
    let mut w = World::new(3).await;
    let reply = request(&mut w.oa, "sepp", "dossier.open", &json!({"niss": w.niss})).await;
    assert_reply(&reply, "rejected", Some("forbidden"));
    assert_eq!(count(&w.env, "dossier").await, 0);
    w.env.finish().await;
}

#[tokio::test]
async fn operator_only_types_are_forbidden_to_organisations_and_reference_to_non_operators() {
    let mut w = World::new(4).await;
    let upsert =
        json!({"id": "400", "kind": "oa", "name": "x", "broker_user": "t-x", "format": "json"});
    let reply = request(&mut w.oa, "oa", "organisation.upsert", &upsert).await;
    assert_reply(&reply, "rejected", Some("forbidden"));
    let reply = request(&mut w.oa, "reference", "organisation.upsert", &upsert).await;
    assert_reply(&reply, "rejected", Some("forbidden"));
    // the operator may not send partner messages on reference
    let reply = request(
        &mut w.operator,
        "reference",
        "dossier.open",
        &json!({"niss": w.niss}),
    )
    .await;
    assert_reply(&reply, "rejected", Some("forbidden"));
    let orgs = count(&w.env, "organisation").await;
    assert_eq!(orgs, 3, "no organisation was added");
    w.env.finish().await;
}

#[tokio::test]
async fn invalid_niss_is_rejected() {
    let mut w = World::new(5).await;
    let mut bad = w.niss.clone();
    let last = bad.pop().unwrap();
    bad.push(if last == '0' { '1' } else { '0' });
    let reply = request(&mut w.gp, "gp", "dossier.open", &json!({"niss": bad})).await;
    assert_reply(&reply, "rejected", Some("invalid_niss"));
    let reply = request(&mut w.gp, "gp", "dossier.open", &json!({"niss": "12345"})).await;
    assert_reply(&reply, "rejected", Some("invalid_niss"));
    assert_eq!(count(&w.env, "dossier").await, 0);
    w.env.finish().await;
}

#[tokio::test]
async fn formatted_niss_is_the_same_insured() {
    let mut w = World::new(6).await;
    let n = &w.niss;
    let formatted = format!(
        "{}.{}.{}-{}.{}",
        &n[0..2],
        &n[2..4],
        &n[4..6],
        &n[6..9],
        &n[9..11]
    );
    let a = request(&mut w.gp, "gp", "dossier.open", &json!({"niss": n})).await;
    let b = request(&mut w.gp, "gp", "dossier.open", &json!({"niss": formatted})).await;
    assert_reply(&b, "accepted", None);
    assert_eq!(
        a.body["result"]["dossier_number"],
        b.body["result"]["dossier_number"]
    );
    assert_eq!(b.body["result"]["created"], false);
    // The in-transit pseudonym, a string as in every result (`<sec1>:<transitInfo>`).
    for reply in [&a, &b] {
        let pseudonym = reply.body["result"]["pseudonym"]
            .as_str()
            .unwrap_or_default();
        assert!(
            pseudonym.len() > 100 && pseudonym.contains(':'),
            "{pseudonym:?}"
        );
    }
    w.env.finish().await;
}

#[tokio::test]
async fn without_a_relation_no_dossier_is_revealed_or_created() {
    let mut w = World::new(7).await;
    let other = synthetic_niss(70_007);
    for (partner, queue) in [(&mut w.oa, "oa"), (&mut w.sepp, "sepp"), (&mut w.gp, "gp")] {
        let reply = request(partner, queue, "dossier.open", &json!({"niss": other})).await;
        assert_reply(&reply, "rejected", Some("no_relation"));
    }
    assert_eq!(count(&w.env, "dossier").await, 0);
    w.env.finish().await;
}

#[tokio::test]
async fn each_kind_gets_access_through_its_own_relation() {
    let mut w = World::new(8).await;
    // OA via affiliation, SEPP via employer → SEPP, GP via therapeutic link
    let a = request(&mut w.gp, "gp", "dossier.open", &json!({"niss": w.niss})).await;
    assert_reply(&a, "accepted", None);
    assert_eq!(a.body["result"]["created"], true);
    let b = request(&mut w.oa, "oa", "dossier.open", &json!({"niss": w.niss})).await;
    let c = request(
        &mut w.sepp,
        "sepp",
        "dossier.open",
        &json!({"niss": w.niss}),
    )
    .await;
    assert_reply(&c, "accepted", None);
    assert_eq!(b.body["result"]["created"], false);
    assert_eq!(
        a.body["result"]["dossier_number"],
        c.body["result"]["dossier_number"]
    );
    assert_eq!(count(&w.env, "dossier").await, 1);

    // the employer leaves the SEPP: access ends
    let reply = request(&mut w.operator, "reference", "relation.unset",
        &json!({"relation": {"kind": "employer_sepp", "employer": crate::EMPLOYER, "sepp": crate::SEPP}})).await;
    assert_reply(&reply, "accepted", None);
    let d = request(
        &mut w.sepp,
        "sepp",
        "dossier.open",
        &json!({"niss": w.niss}),
    )
    .await;
    assert_reply(&d, "rejected", Some("no_relation"));
    w.env.finish().await;
}

#[tokio::test]
async fn a_deceased_insured_is_closed_to_everyone() {
    let mut w = World::new(9).await;
    w.env
        .relate(
            &mut w.operator,
            json!({"kind": "insured_deceased", "niss": w.niss, "died_on": "2026-11-01"}),
        )
        .await;
    let reply = request(&mut w.oa, "oa", "dossier.open", &json!({"niss": w.niss})).await;
    assert_reply(&reply, "rejected", Some("deceased"));
    let reply = request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &crate::trajet(&w.niss, "r1", "rtw_ami", "en_cours", 1),
    )
    .await;
    assert_reply(&reply, "rejected", Some("deceased"));
    assert_eq!(count(&w.env, "trajet").await, 0);
    // the death is a fact: it takes no valid_until
    let reply = request(
        &mut w.operator,
        "reference",
        "relation.set",
        &json!({
        "relation": {"kind": "insured_deceased", "niss": w.niss, "died_on": "2026-11-01"},
        "valid_until": "2030-01-01T00:00:00Z"}),
    )
    .await;
    assert_reply(&reply, "rejected", Some("invalid_payload"));
    w.env.finish().await;
}

#[tokio::test]
async fn relations_expire_after_24_hours_unless_valid_until_says_otherwise() {
    let mut w = World::new(10).await;
    let until: time::OffsetDateTime = sqlx::query_scalar(
        "SELECT valid_until FROM insured_relation WHERE org_kind = 'gp' AND org_id = $1",
    )
    .bind(GP)
    .fetch_one(&w.env.db)
    .await
    .unwrap();
    let hours = (until - time::OffsetDateTime::now_utc()).whole_minutes() as f64 / 60.0;
    assert!(
        (23.9..=24.0).contains(&hours),
        "default validity is 24 h, got {hours} h"
    );

    // a valid_until in the past means the relation has already ended
    let reply = request(
        &mut w.operator,
        "reference",
        "relation.set",
        &json!({
        "relation": {"kind": "insured_gp", "niss": w.niss, "gp": GP},
        "valid_until": "2020-01-01T00:00:00Z"}),
    )
    .await;
    assert_reply(&reply, "accepted", None);
    let reply = request(&mut w.gp, "gp", "dossier.open", &json!({"niss": w.niss})).await;
    assert_reply(&reply, "rejected", Some("no_relation"));
    // the OA's own relation is untouched
    let reply = request(&mut w.oa, "oa", "dossier.open", &json!({"niss": w.niss})).await;
    assert_reply(&reply, "accepted", None);
    let _ = OA;
    w.env.finish().await;
}

#[tokio::test]
async fn xml_messages_are_accepted_like_json() {
    let mut w = World::new(11).await;
    let body = format!(
        "<?xml version=\"1.0\"?><dossier_open xmlns=\"urn:be:trio:gateway:v1\"><niss>{}</niss></dossier_open>",
        w.niss
    );
    w.gp.publish(&Outgoing {
        queue: "gp",
        message_type: "dossier.open",
        message_id: "xml-1",
        content_type: "application/xml",
        body: body.into_bytes(),
        want_reply: true,
    })
    .await
    .unwrap();
    let reply = w.gp.reply_to("xml-1", trio_tests::WAIT).await.unwrap();
    assert_reply(&reply, "accepted", None);
    assert_eq!(count(&w.env, "dossier").await, 1);
    w.env.finish().await;
}
