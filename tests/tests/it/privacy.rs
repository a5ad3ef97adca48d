//! The NISS in clear never reaches the database, the logs, replies or outbound messages
//! (CONTRACT.md §6).

use crate::{GP, SEPP, World, trajet};
use serde_json::json;
use std::time::Duration;
use trio_tests::{captured_logs, request};

#[tokio::test]
async fn no_cleartext_niss_in_database_logs_replies_or_outbound_messages() {
    let mut w = World::new(60).await;
    let mut to_gp = w.gp.listen(&format!("gp.{GP}")).await.unwrap();
    let mut to_sepp = w.sepp.listen(&format!("sepp.{SEPP}")).await.unwrap();
    let n = w.niss.clone();
    let formatted = format!(
        "{}.{}.{}-{}.{}",
        &n[0..2],
        &n[2..4],
        &n[4..6],
        &n[6..9],
        &n[9..11]
    );
    let mut replies = Vec::new();
    replies.push(request(&mut w.gp, "gp", "dossier.open", &json!({"niss": formatted})).await);
    replies.push(
        request(
            &mut w.oa,
            "oa",
            "trajet.upsert",
            &trajet(&n, "p", "rtw_ami", "en_cours", 1),
        )
        .await,
    );
    replies.push(
        request(
            &mut w.oa,
            "oa",
            "trajet.upsert",
            &trajet(&n, "p", "rtw_ami", "accepte", 2),
        )
        .await,
    );
    let mut bad = n.clone();
    bad.replace_range(10..11, if n.ends_with('0') { "1" } else { "0" });
    replies.push(request(&mut w.oa, "oa", "dossier.open", &json!({"niss": bad})).await);

    let mut outbound = to_gp.drain(Duration::from_secs(2)).await.unwrap();
    outbound.extend(to_sepp.drain(Duration::from_secs(1)).await.unwrap());
    assert!(outbound.len() >= 2);

    let forbidden = [n.as_str(), formatted.as_str(), bad.as_str()];
    let db = w.env.dump_database().await;
    assert!(db.contains("TRIO-"), "the dump is not empty");
    let logs = captured_logs();
    for secret in forbidden {
        assert!(!db.contains(secret), "NISS found in the database");
        assert!(!logs.contains(secret), "NISS found in the logs");
        for r in &replies {
            assert!(
                !r.body.to_string().contains(secret),
                "NISS found in a reply"
            );
        }
        for o in &outbound {
            assert!(
                !String::from_utf8_lossy(&o.data).contains(secret),
                "NISS in an outbound message"
            );
        }
    }
    // what is stored is the 88-character at-rest pseudonym
    let pseudonym: String = sqlx::query_scalar("SELECT pseudonym FROM dossier")
        .fetch_one(&w.env.db)
        .await
        .unwrap();
    assert_eq!(pseudonym.len(), 88);
    w.env.finish().await;
}
