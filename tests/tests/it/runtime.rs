//! The runtime: the quorum topology (declared again harmlessly, refused at once when it
//! conflicts), batches, poison messages and writes that did not happen, graceful shutdown, and
//! the management API client the tests rely on.

use crate::{
    GP, World, assert_reply, count, hold_insured_lock, queue_depth, settles_to_zero, trajet,
};
use serde_json::json;
use std::time::Duration;
use trio_gateway::partner::{Outgoing, header};
use trio_tests::{Options, TestEnv, WAIT, request, send};

#[tokio::test]
async fn the_topology_is_quorum_and_declaring_it_again_is_harmless() {
    let w = World::new(70).await;
    // a second declaration (another process starting) succeeds
    let pool = trio_gateway::broker::pool(&w.env.config, "test", 1).unwrap();
    let channel = trio_gateway::broker::channel(&pool, Duration::from_secs(5))
        .await
        .unwrap();
    trio_gateway::broker::declare_topology(&channel, &w.env.config)
        .await
        .unwrap();
    // the inbound queues are quorum queues: re-declaring one as classic is refused
    let classic = channel
        .queue_declare(
            "trio.inbound.oa",
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await;
    assert!(
        classic.is_err(),
        "trio.inbound.oa must be a quorum queue with arguments"
    );
    w.env.finish().await;
}

#[tokio::test]
async fn many_messages_are_applied_in_batches_with_one_outcome_each() {
    let mut w = World::new(71).await;
    // recipients are bound, so every event is routable and the outbox empties
    let _to_gp = w.gp.listen(&format!("gp.{}", crate::GP)).await.unwrap();
    let _to_sepp = w
        .sepp
        .listen(&format!("sepp.{}", crate::SEPP))
        .await
        .unwrap();
    let n = w.niss.clone();
    let ids: Vec<String> = (0..300).map(|i| format!("bulk-{i}")).collect();
    let bodies: Vec<Vec<u8>> = (0..300)
        .map(|i| {
            trajet(
                &n,
                &format!("t{}", i % 30),
                "rtw_ami",
                "en_cours",
                i64::from(i / 30 + 1),
            )
            .to_string()
            .into_bytes()
        })
        .collect();
    let messages: Vec<Outgoing> = ids
        .iter()
        .zip(&bodies)
        .map(|(id, body)| Outgoing {
            queue: "oa",
            message_type: "trajet.upsert",
            message_id: id,
            content_type: "application/json",
            body: body.clone(),
            want_reply: true,
        })
        .collect();
    w.oa.publish_many(&messages).await.unwrap();
    // With two batches in flight an older version may arrive after a newer one: it is then
    // answered `stale`; either way every message gets exactly one outcome.
    let mut answered = std::collections::HashSet::new();
    for _ in 0..300 {
        let r =
            w.oa.next_reply(WAIT)
                .await
                .unwrap()
                .expect("one reply per message");
        let status = r.body["status"].as_str().unwrap().to_owned();
        assert!(status == "accepted" || status == "stale", "{}", r.body);
        assert!(answered.insert(r.correlation_id), "one reply per message");
    }
    assert_eq!(answered.len(), 300);
    let max_version: i64 = sqlx::query_scalar("SELECT min(version) FROM trajet")
        .fetch_one(&w.env.db)
        .await
        .unwrap();
    assert_eq!(max_version, 10, "every trajet ends at its highest version");
    assert_eq!(count(&w.env, "trajet").await, 30);
    // every batch is acknowledged once its messages are confirmed, and none waits in the outbox
    let waiting = settles_to_zero(|| queue_depth(&w.env, "trio.inbound.oa")).await;
    assert_eq!(waiting, 0, "every message acknowledged");
    assert_eq!(count(&w.env, "outbox").await, 0);
    w.env.finish().await;
}

#[tokio::test]
async fn a_poison_message_ends_in_the_dead_letter_queue_and_the_others_go_through() {
    let env = TestEnv::start_with(Options {
        delivery_limit: 3,
        ..Options::default()
    })
    .await;
    simulate_handler_bug(&env, "poison").await;
    let mut w = World::with_env(env, 72).await;
    let mut dead = w.operator.consume_queue("trio.dead").await.unwrap();
    let n = w.niss.clone();
    let poison = trajet(&n, "poison", "rtw_ami", "en_cours", 1)
        .to_string()
        .into_bytes();
    let good = trajet(&n, "good", "rtw_ami", "en_cours", 1)
        .to_string()
        .into_bytes();
    w.oa.publish_many(&[
        Outgoing {
            queue: "oa",
            message_type: "trajet.upsert",
            message_id: "p",
            content_type: "application/json",
            body: poison,
            want_reply: true,
        },
        Outgoing {
            queue: "oa",
            message_type: "trajet.upsert",
            message_id: "g",
            content_type: "application/json",
            body: good,
            want_reply: true,
        },
    ])
    .await
    .unwrap();
    let r = w.oa.reply_to("g", WAIT).await.unwrap();
    assert_reply(&r, "accepted", None);
    let letter = dead
        .next(Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the poison message is dead-lettered");
    assert_eq!(
        header(&letter, "x-trio-error").as_deref(),
        Some("delivery_limit")
    );
    assert_eq!(
        letter.properties.message_id().as_ref().unwrap().as_str(),
        "p"
    );
    // and the consumer goes on
    let r = request(&mut w.oa, "oa", "dossier.open", &json!({"niss": n})).await;
    assert_reply(&r, "accepted", None);
    assert_eq!(count(&w.env, "trajet").await, 1);
    w.env.finish().await;
}

#[tokio::test]
async fn graceful_shutdown_loses_nothing_and_a_restart_finishes_the_rest() {
    let mut w = World::new(73).await;
    let n = w.niss.clone();
    let total = 2000;
    let ids: Vec<String> = (0..total).map(|i| format!("s-{i}")).collect();
    let bodies: Vec<Vec<u8>> = (0..total)
        .map(|i| {
            trajet(&n, &format!("t{i}"), "rtw_ami", "en_cours", 1)
                .to_string()
                .into_bytes()
        })
        .collect();
    let messages: Vec<Outgoing> = ids
        .iter()
        .zip(&bodies)
        .map(|(id, body)| Outgoing {
            queue: "oa",
            message_type: "trajet.upsert",
            message_id: id,
            content_type: "application/json",
            body: body.clone(),
            want_reply: false,
        })
        .collect();
    w.oa.publish_many(&messages).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.env.stop_gateway().await.unwrap();
    let done_before_restart = count(&w.env, "inbox").await - 7;
    w.env.start_gateway();
    let mut done = 0;
    for _ in 0..200 {
        done = count(&w.env, "inbox").await - 7;
        if done == total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(done, total, "every message has exactly one outcome");
    assert_eq!(count(&w.env, "trajet").await, total);
    let created: i64 =
        sqlx::query_scalar("SELECT count(*) FROM history WHERE operation = 'trajet_created'")
            .fetch_one(&w.env.db)
            .await
            .unwrap();
    assert_eq!(created, total, "nothing applied twice");
    eprintln!("graceful shutdown: {done_before_restart} of {total} done before the restart");
    w.env.finish().await;
}

#[tokio::test]
async fn dlq_list_shows_letters_without_their_contents_and_replay_puts_them_back() {
    let env = TestEnv::start_with(Options {
        delivery_limit: 2,
        ..Options::default()
    })
    .await;
    // refused until the bug is fixed
    simulate_handler_bug(&env, "hits-a-bug").await;
    let mut w = World::with_env(env, 74).await;
    let n = w.niss.clone();
    let body = trajet(&n, "hits-a-bug", "rtw_ami", "en_cours", 1);
    w.oa.publish(&Outgoing::json("oa", "trajet.upsert", "bug-1", &body))
        .await
        .unwrap();
    // it reaches trio.dead after its delivery limit
    let mut letters = Vec::new();
    for _ in 0..100 {
        letters = trio_gateway::dlq::list(&w.env.config, 100).await.unwrap();
        if !letters.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let letter = letters
        .iter()
        .find(|l| l.message_id == "bug-1")
        .expect("the failing message is listed");
    assert_eq!(letter.message_type, "trajet.upsert");
    assert_eq!(letter.sender, w.oa.user());
    assert_eq!(letter.error, "delivery_limit");
    assert_eq!(letter.queue, "oa");
    assert!(letter.dead_at.is_some());
    let mut printed = Vec::new();
    trio_gateway::dlq::print(&letters, &mut printed).unwrap();
    let printed = String::from_utf8(printed).unwrap();
    assert!(
        printed.contains("bug-1") && printed.contains("delivery_limit"),
        "{printed}"
    );
    assert!(
        !printed.contains(&n),
        "no payload contents in the listing: {printed}"
    );
    assert!(
        !printed.contains("hits-a-bug"),
        "no payload contents: {printed}"
    );
    // listing leaves the letter where it is
    assert_eq!(
        trio_gateway::dlq::list(&w.env.config, 100)
            .await
            .unwrap()
            .len(),
        1
    );

    // the bug is fixed; replaying the letter applies it, with its original reply_to
    sqlx::raw_sql("DROP TRIGGER handler_bug ON trajet")
        .execute(&w.env.db)
        .await
        .unwrap();
    let other = trio_gateway::dlq::replay(
        &w.env.config,
        &trio_gateway::dlq::Selection::Id("no-such-id".into()),
    )
    .await
    .unwrap();
    assert_eq!(other, 0, "replay --id picks only that message");
    let replayed = trio_gateway::dlq::replay(
        &w.env.config,
        &trio_gateway::dlq::Selection::Id("bug-1".into()),
    )
    .await
    .unwrap();
    assert_eq!(replayed, 1);
    let r = w.oa.reply_to("bug-1", WAIT).await.unwrap();
    assert_reply(&r, "accepted", None);
    assert_eq!(count(&w.env, "trajet").await, 1);
    assert!(
        trio_gateway::dlq::list(&w.env.config, 100)
            .await
            .unwrap()
            .is_empty()
    );
    w.env.finish().await;
}

/// A "handler bug": the database refuses, with a non-transient error, any trajet with this ref
/// (until `DROP TRIGGER handler_bug ON trajet`).
async fn simulate_handler_bug(env: &TestEnv, reference: &str) {
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION handler_bug() RETURNS trigger AS $$ BEGIN \
           IF NEW.ref = '{reference}' THEN RAISE EXCEPTION 'simulated handler bug'; END IF; \
           RETURN NEW; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER handler_bug BEFORE INSERT ON trajet FOR EACH ROW EXECUTE FUNCTION handler_bug();"
    ))
    .execute(&env.db)
    .await
    .unwrap();
}

#[tokio::test]
async fn gateway_sessions_never_jit_and_the_relay_commits_without_waiting_for_the_flush() {
    // The batch path's sessions: no JIT (on never-analyzed tables the load's cost estimates
    // crossed jit_above_cost and every batch compiled it), commits synchronous (the inbound
    // ack follows the commit), generic plans from the first execution (small batches kept
    // PostgreSQL planning the load for each one), no sequential scan where an index answers (a
    // plan made on small tables kept scanning them whole). The relay's: no JIT either, commits not
    // waiting for the WAL flush (a lost delete only re-publishes a row with the same
    // message_id), statements planned with their parameters.
    let env = TestEnv::start().await;
    let setting = |pool: sqlx::PgPool, name: &'static str| async move {
        sqlx::query_scalar::<_, String>(&format!("SHOW {name}"))
            .fetch_one(&pool)
            .await
            .expect(name)
    };
    let workers = trio_gateway::serve::connect_db(&env.config, Some(Duration::from_secs(10)))
        .await
        .expect("worker pool");
    assert_eq!(setting(workers.clone(), "jit").await, "off");
    assert_eq!(setting(workers.clone(), "synchronous_commit").await, "on");
    assert_eq!(
        setting(workers.clone(), "plan_cache_mode").await,
        "force_generic_plan"
    );
    assert_eq!(setting(workers.clone(), "enable_seqscan").await, "off");
    let relay = trio_gateway::serve::connect_relay_db(&env.config)
        .await
        .expect("relay pool");
    assert_eq!(setting(relay.clone(), "jit").await, "off");
    assert_eq!(setting(relay.clone(), "synchronous_commit").await, "off");
    assert_eq!(
        setting(relay.clone(), "plan_cache_mode").await,
        "force_custom_plan"
    );
    workers.close().await;
    relay.close().await;
    env.finish().await;
}

#[tokio::test]
async fn the_sweeper_publishes_rows_a_crashed_process_left_and_keeps_unroutable_ones() {
    // Rows as a process that died after its commit leaves them: claim expired, never published.
    // One has no queue bound for its routing key yet; it is swept between routable ones, so the
    // broker may confirm it together with them in one `multiple` ack, and lapin then attach its
    // return to another message's confirmation. (Matching returns by confirmation once made the
    // relay delete the unroutable row, losing it, and keep a routed one.)
    let env = TestEnv::start().await;
    let operator = env.operator().await;
    let mut listener = operator.listen("gp.sweeper-test").await.unwrap();
    let before: Vec<uuid::Uuid> = (0..30).map(|_| uuid::Uuid::new_v4()).collect();
    let after: Vec<uuid::Uuid> = (0..30).map(|_| uuid::Uuid::new_v4()).collect();
    let unroutable = uuid::Uuid::new_v4();
    let mut ids = before.clone();
    let mut keys = vec!["gp.sweeper-test"; 30];
    let mut expired_seconds_ago = vec![3; 30];
    ids.push(unroutable);
    keys.push("gp.nobody-listens");
    expired_seconds_ago.push(2);
    ids.extend(&after);
    keys.extend(vec!["gp.sweeper-test"; 30]);
    expired_seconds_ago.extend(vec![1; 30]);
    sqlx::query(
        "INSERT INTO outbox (message_id, exchange, routing_key, type, content_type, body, \
                             claimed_until) \
         SELECT m, 'trio.outbound', k, 'trajet.updated', 'application/json', '{}'::bytea, \
                now() - make_interval(secs => s) \
         FROM UNNEST($1::uuid[], $2::text[], $3::int[]) AS r(m, k, s)",
    )
    .bind(&ids)
    .bind(&keys)
    .bind(&expired_seconds_ago)
    .execute(&env.db)
    .await
    .unwrap();

    // Every routable row is published with the message_id it was committed with.
    let mut expected: std::collections::BTreeSet<String> = before
        .iter()
        .chain(&after)
        .map(|id| id.to_string())
        .collect();
    while !expected.is_empty() {
        let delivery = listener
            .next(WAIT)
            .await
            .unwrap()
            .expect("the sweeper publishes every expired routable row");
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string());
        assert!(
            id.is_some_and(|id| expected.remove(&id)),
            "an unexpected message or a second copy"
        );
    }
    // The confirmed rows are deleted; the returned one stays, claimed for a minute.
    let mut left = Vec::new();
    for _ in 0..100 {
        left = sqlx::query_as::<_, (uuid::Uuid, i32, bool)>(
            "SELECT message_id, attempts, claimed_until > now() + interval '30 seconds' \
             FROM outbox",
        )
        .fetch_all(&env.db)
        .await
        .unwrap();
        if left == [(unroutable, 1, true)] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        left,
        vec![(unroutable, 1, true)],
        "only the unroutable row is left, tried once and claimed for a minute"
    );
    env.finish().await;
}

#[tokio::test]
async fn a_slow_batch_says_in_a_warning_where_its_time_went() {
    // A batch that waits for its insured's lock (another transaction holds it) takes longer than
    // SLOW_BATCH: its warning names each step with its time, the lock wait under `locks`, and
    // carries no NISS.
    let mut w = World::new(72).await;
    let first = request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&w.niss, "slow", "rtw_ami", "en_cours", 1),
    )
    .await;
    assert_reply(&first, "accepted", None);
    let held = Duration::from_millis(600);
    let (holder, _) = hold_insured_lock(
        &w.env,
        first.body["result"]["dossier_number"].as_str().unwrap(),
    )
    .await;
    let message_id = send(
        &w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&w.niss, "slow", "rtw_ami", "termine", 2),
    )
    .await;
    tokio::time::sleep(held).await;
    holder.commit().await.unwrap();
    let r = w.oa.reply_to(&message_id, WAIT).await.unwrap();
    assert_reply(&r, "accepted", None);

    // Other tests of this binary log too: find the batch that waited at least most of `held`.
    let logs = trio_tests::captured_logs();
    let waited = |line: &&str| {
        line.split("begin and lock ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|ms| ms.parse::<f64>().ok())
            .is_some_and(|ms| ms >= 400.0)
    };
    let line = logs
        .lines()
        .filter(|l| l.contains("slow batch"))
        .find(waited)
        .unwrap_or_else(|| panic!("no slow-batch warning with a lock wait; logs:\n{logs}"));
    for step in [
        "prepare",
        "begin and lock",
        "load",
        "apply",
        "flush",
        "commit",
    ] {
        assert!(line.contains(step), "{step} missing from: {line}");
    }
    assert!(!line.contains(&w.niss), "a NISS in the warning");
    w.env.finish().await;
}

#[tokio::test]
async fn a_trajet_update_that_writes_nothing_fails_its_batch_instead_of_reporting_success() {
    // A trajet the load found but the flush's UPDATE misses — here a trigger skips the row, as
    // a writer deleting rows without the insured's lock would — must not leave an `accepted`
    // outcome, a history line or a `trajet.updated` for a write that did not happen.
    let env = TestEnv::start_with(Options {
        delivery_limit: 2,
        ..Options::default()
    })
    .await;
    let mut w = World::with_env(env, 75).await;
    let mut dead = w.operator.consume_queue("trio.dead").await.unwrap();
    let mut to_gp = w.gp.listen(&format!("gp.{GP}")).await.unwrap();
    let n = w.niss.clone();
    let r = request(
        &mut w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&n, "lost", "rtw_ami", "en_cours", 1),
    )
    .await;
    assert_reply(&r, "accepted", None);
    assert_eq!(to_gp.drain(Duration::from_secs(1)).await.unwrap().len(), 1);
    sqlx::raw_sql(
        "CREATE FUNCTION skip_update() RETURNS trigger AS $$ BEGIN \
           IF OLD.ref = 'lost' THEN RETURN NULL; END IF; RETURN NEW; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER skip_update BEFORE UPDATE ON trajet \
           FOR EACH ROW EXECUTE FUNCTION skip_update();",
    )
    .execute(&w.env.db)
    .await
    .unwrap();
    let history = count(&w.env, "history").await;

    let message_id = send(
        &w.oa,
        "oa",
        "trajet.upsert",
        &trajet(&n, "lost", "rtw_ami", "termine", 2),
    )
    .await;
    let letter = dead
        .next(Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the message whose update wrote nothing is dead-lettered");
    assert_eq!(
        letter.properties.message_id().as_ref().unwrap().as_str(),
        message_id
    );
    let (version, status): (i64, String) =
        sqlx::query_as("SELECT version, status FROM trajet WHERE ref = 'lost'")
            .fetch_one(&w.env.db)
            .await
            .unwrap();
    assert_eq!((version, status.as_str()), (1, "en_cours"));
    let outcomes: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox WHERE message_id = $1")
        .bind(&message_id)
        .fetch_one(&w.env.db)
        .await
        .unwrap();
    assert_eq!(
        outcomes, 0,
        "no outcome recorded for the write that did not happen"
    );
    assert_eq!(count(&w.env, "history").await, history, "no history line");
    assert!(
        to_gp
            .drain(Duration::from_secs(1))
            .await
            .unwrap()
            .is_empty(),
        "no trajet.updated for version 2"
    );
    w.env.finish().await;
}

#[tokio::test]
async fn a_new_broker_user_ensured_by_many_clients_at_once_succeeds_for_every_one() {
    // Parallel tests on a fresh broker all ensure the same users, and RabbitMQ answers all but
    // one of simultaneous creations 400 `user_already_exists` (about one round in two, before
    // the retry: ten rounds make it all but certain).
    let services = trio_tests::services::get()
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let admin = trio_gateway::admin::BrokerAdmin::new(&services.admin_url).unwrap();
    for round in 0..10 {
        let name = format!("t-race-{}", uuid::Uuid::new_v4());
        let results =
            futures::future::join_all((0..8).map(|_| admin.ensure_user(&name, "x", ""))).await;
        admin.delete_user(&name).await.unwrap();
        for result in results {
            result.unwrap_or_else(|e| panic!("round {round}: {e:#}"));
        }
    }
}

#[tokio::test]
async fn a_topology_declared_with_other_arguments_stops_the_start_at_once() {
    // The queues exist with this test's delivery limit. A gateway configured with another one
    // cannot declare them, and waiting changes nothing: it says what to do and gives up.
    let env = TestEnv::start().await;
    let _operator = env.operator().await; // once the test's gateway has declared the topology
    let mut config = env.config.clone();
    config.delivery_limit += 1;
    let pool = trio_gateway::broker::pool(&config, "test", 1).unwrap();
    let error = tokio::time::timeout(
        Duration::from_secs(30),
        trio_gateway::serve::declare(&config, &pool),
    )
    .await
    .expect("the declaration should fail at once, not be retried")
    .expect_err("queues declared with another delivery limit");
    let message = format!("{error:#}");
    assert!(message.contains("inequivalent arg"), "{message}");
    assert!(message.contains("TRIO_DELIVERY_LIMIT"), "{message}");
    env.finish().await;
}
