//! What a committed message caused is kept in its inbox row, and the inbound message is
//! acknowledged only once the broker confirmed it (CONTRACT.md §4, §5): a message committed but
//! never acknowledged — the process died between its commit and the confirms — is delivered
//! again by the broker, answered as a duplicate, and publishes what it caused again, with the
//! same message ids; so does a committed message the broker dead-lettered, when the operator
//! replays it. What the broker cannot route yet, or refuses, waits in the outbox table instead,
//! and is published again until the broker confirms it.

use crate::{GP, SEPP, World, assert_reply, count, trajet, upsert_from_oa};
use crate::{inbound, queue_depth, settles_to_zero, world_without_gateway};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;
use trio_gateway::partner::{Listener, Outgoing};
use trio_handlers::context::Context;
use trio_handlers::{HeldConnection, OutboundMessage, SourceQueue, process_batch};
use trio_schemas::MessageType;
use trio_tests::{WAIT, request_with_id};
use uuid::Uuid;

fn ids(messages: &[OutboundMessage]) -> BTreeSet<Uuid> {
    messages.iter().map(|m| m.message_id).collect()
}

fn of_type<'a>(messages: &'a [OutboundMessage], message_type: &str) -> Vec<&'a OutboundMessage> {
    messages
        .iter()
        .filter(|m| m.message_type == message_type)
        .collect()
}

/// No gateway running, the SEPP and the GP listening, and an OA's `trajet.upsert` waiting in its
/// queue.
struct Waiting {
    w: World,
    ctx: Context,
    to_sepp: Listener,
    to_gp: Listener,
    body: Value,
}

/// [`Waiting`], for trajet `reference`, published as `message_id`.
async fn oa_upsert_waiting(seq: u32, reference: &str, message_id: &str) -> Waiting {
    let (w, ctx) = world_without_gateway(seq).await;
    let to_sepp = w.sepp.listen(&format!("sepp.{SEPP}")).await.unwrap();
    let to_gp = w.gp.listen(&format!("gp.{GP}")).await.unwrap();
    let body = trajet(&w.niss, reference, "rtw_ami", "en_cours", 1);
    w.oa.publish(&Outgoing::json("oa", "trajet.upsert", message_id, &body))
        .await
        .unwrap();
    Waiting {
        w,
        ctx,
        to_sepp,
        to_gp,
        body,
    }
}

/// A channel as the operator (`guest`), on a connection of the test's own (as a gateway about
/// to die would hold, or to shape the broker).
async fn operator_channel(w: &World) -> (Connection, Channel) {
    let connection =
        Connection::connect(&w.env.amqp_url_as("guest"), ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

/// Commits an OA's `trajet.upsert` as a gateway would, publishing nothing: the ids of the two
/// events (to the SEPP and the GP) it caused.
async fn commit_without_publishing(
    ctx: &Context,
    message_id: &str,
    body: &Value,
) -> BTreeSet<Uuid> {
    let first = process_batch(
        ctx,
        &mut HeldConnection::default(),
        &[upsert_from_oa(message_id, body)],
    )
    .await
    .unwrap();
    assert_eq!(first.outcomes[0].status.as_str(), "accepted");
    let caused = ids(&of_type(&first.outbound, "trajet.updated")
        .into_iter()
        .cloned()
        .collect::<Vec<_>>());
    assert_eq!(caused.len(), 2, "an event for the SEPP and one for the GP");
    caused
}

/// The ids of the `trajet.updated` events the SEPP and the GP received, once both are quiet.
async fn events_received(to_sepp: &mut Listener, to_gp: &mut Listener) -> BTreeSet<Uuid> {
    let quiet = Duration::from_secs(2);
    let mut deliveries = to_sepp.drain(quiet).await.unwrap();
    deliveries.extend(to_gp.drain(quiet).await.unwrap());
    deliveries
        .iter()
        .map(|delivery| {
            assert_eq!(
                delivery.properties.kind().as_ref().unwrap().as_str(),
                "trajet.updated"
            );
            let id = delivery.properties.message_id().as_ref().unwrap().as_str();
            Uuid::parse_str(id).unwrap()
        })
        .collect()
}

/// The stored version of the trajet with this ref.
async fn version_of(w: &World, reference: &str) -> i64 {
    sqlx::query_scalar("SELECT version FROM trajet WHERE ref = $1")
        .bind(reference)
        .fetch_one(&w.env.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_duplicate_publishes_again_what_its_first_delivery_caused_once_per_batch() {
    let (w, ctx) = world_without_gateway(60).await;
    let body = trajet(&w.niss, "kept", "rtw_ami", "en_cours", 1);
    let with_reply = |id: &str| {
        let mut message = upsert_from_oa(id, &body);
        message.reply_to = Some("replies".to_owned());
        message
    };

    // The batches below run on one connection, as a worker's do.
    let mut connection = HeldConnection::default();
    // The message and a duplicate of it in one batch: the duplicate repeats nothing the batch
    // publishes anyway, and only adds its own reply.
    let first = process_batch(
        &ctx,
        &mut connection,
        &[with_reply("m-kept"), with_reply("m-kept")],
    )
    .await
    .unwrap();
    let statuses: Vec<&str> = first.outcomes.iter().map(|o| o.status.as_str()).collect();
    assert_eq!(statuses, ["accepted", "duplicate"]);
    let events = of_type(&first.outbound, "trajet.updated");
    let recipients: BTreeSet<&str> = events.iter().map(|m| m.routing_key.as_str()).collect();
    assert_eq!(
        recipients,
        BTreeSet::from([format!("sepp.{SEPP}").as_str(), format!("gp.{GP}").as_str()])
    );
    assert_eq!(of_type(&first.outbound, "reply").len(), 2);
    assert_eq!(first.outbound.len(), 4, "two events and two replies");

    let status = |m: &OutboundMessage| {
        let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
        body["status"].as_str().unwrap_or("").to_owned()
    };
    assert_eq!(status(&first.outbound[2]), "accepted");
    assert_eq!(status(&first.outbound[3]), "duplicate");

    // The sender re-sends it, in a later batch: only the duplicate's reply (whose id is stable
    // too). A message the broker did not deliver before had its first delivery acknowledged,
    // so what that one caused was confirmed.
    let resent = process_batch(&ctx, &mut connection, &[with_reply("m-kept")])
        .await
        .unwrap();
    assert_eq!(resent.outcomes[0].status.as_str(), "duplicate");
    assert_eq!(resent.outbound, first.outbound[3..]);

    // The broker delivers it again (its first delivery was never acknowledged): everything the
    // first caused goes out again, as it was (same ids, same bodies), then the duplicate's
    // reply.
    let mut redelivered = with_reply("m-kept");
    redelivered.redelivered = true;
    let again = process_batch(&ctx, &mut connection, &[redelivered])
        .await
        .unwrap();
    assert_eq!(again.outcomes[0].status.as_str(), "duplicate");
    assert_eq!(again.outbound, first.outbound);

    // Nothing was applied twice.
    let version: i64 = sqlx::query_scalar("SELECT version FROM trajet WHERE ref = 'kept'")
        .fetch_one(&w.env.db)
        .await
        .unwrap();
    assert_eq!(version, 1);
    let lines: i64 =
        sqlx::query_scalar("SELECT count(*) FROM history WHERE resource = 'trajet_rtw_ami'")
            .fetch_one(&w.env.db)
            .await
            .unwrap();
    assert_eq!(lines, 1, "one history line for the one update");

    // A message that caused nothing keeps nothing.
    let stranger = inbound(
        SourceQueue::Oa,
        "t-nobody",
        MessageType::TrajetUpsert,
        "m-stranger",
        &body,
    );
    let refused = process_batch(&ctx, &mut connection, &[stranger])
        .await
        .unwrap();
    assert_eq!(refused.outcomes[0].status.as_str(), "rejected");
    assert!(refused.outbound.is_empty());
    let kept: Vec<(String, bool)> = sqlx::query_as(
        "SELECT message_id, outbound IS NULL FROM inbox WHERE message_id LIKE 'm-%' \
         ORDER BY message_id",
    )
    .fetch_all(&w.env.db)
    .await
    .unwrap();
    assert_eq!(
        kept,
        [
            ("m-kept".to_owned(), false),
            ("m-stranger".to_owned(), true)
        ]
    );
    w.env.finish().await;
}

#[tokio::test]
async fn a_message_committed_but_never_acknowledged_publishes_its_events_when_delivered_again() {
    // A gateway takes the message from its queue ...
    let Waiting {
        mut w,
        ctx,
        mut to_sepp,
        mut to_gp,
        body,
    } = oa_upsert_waiting(61, "crash", "m-crash").await;
    let (connection, channel) = operator_channel(&w).await;
    let mut taken = channel
        .basic_consume(
            "trio.inbound.oa",
            "a-gateway-about-to-die",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(WAIT, taken.next())
        .await
        .expect("the message")
        .expect("a delivery")
        .unwrap();
    assert!(!delivery.redelivered);
    // ... commits it (applied here as that gateway would) ...
    let caused = commit_without_publishing(&ctx, "m-crash", &body).await;
    // ... and dies before publishing or acknowledging anything.
    connection.close(200, "crash").await.unwrap();

    // A gateway starts, and the broker delivers the message again.
    w.env.start_gateway();
    let reply = w.oa.reply_to("m-crash", WAIT).await.unwrap();
    assert_eq!(reply.body["status"], "duplicate");
    assert_eq!(reply.body["detail"], "accepted");
    assert_eq!(
        events_received(&mut to_sepp, &mut to_gp).await,
        caused,
        "the events the first delivery committed"
    );
    assert_eq!(count(&w.env, "outbox").await, 0);
    assert_eq!(version_of(&w, "crash").await, 1, "applied once");
    w.env.finish().await;
}

#[tokio::test]
async fn an_event_nobody_can_receive_yet_waits_in_the_outbox_and_the_message_is_acknowledged() {
    let mut w = World::new(62).await;
    // Only the GP listens: the SEPP's event is unroutable.
    let mut to_gp = w.gp.listen(&format!("gp.{GP}")).await.unwrap();
    let body = trajet(&w.niss, "nobody", "rtw_ami", "en_cours", 1);
    let r = request_with_id(&mut w.oa, "oa", "trajet.upsert", "m-nobody", &body).await;
    assert_reply(&r, "accepted", None);
    assert_eq!(to_gp.drain(Duration::from_secs(1)).await.unwrap().len(), 1);

    // The returned event is kept for a minute, then retried by the sweeper ...
    let mut kept: Vec<(String, i32, bool)> = Vec::new();
    for _ in 0..50 {
        kept = sqlx::query_as(
            "SELECT routing_key, attempts, claimed_until > now() + interval '50 seconds' \
             FROM outbox",
        )
        .fetch_all(&w.env.db)
        .await
        .unwrap();
        if !kept.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(kept, [(format!("sepp.{SEPP}"), 1, true)]);
    // ... and the inbound message is acknowledged: nothing left in its queue, not even unacked.
    let waiting = settles_to_zero(|| queue_depth(&w.env, "trio.inbound.oa")).await;
    assert_eq!(waiting, 0, "the message was acknowledged");

    // Once the SEPP listens and the minute is over, the sweeper delivers it and deletes the row.
    let mut to_sepp = w.sepp.listen(&format!("sepp.{SEPP}")).await.unwrap();
    sqlx::query("UPDATE outbox SET claimed_until = now()")
        .execute(&w.env.db)
        .await
        .unwrap();
    let got = to_sepp.next(Duration::from_secs(10)).await.unwrap();
    let got = got.expect("the SEPP's event, from the outbox");
    assert_eq!(
        got.properties.kind().as_ref().unwrap().as_str(),
        "trajet.updated"
    );
    assert_eq!(settles_to_zero(|| count(&w.env, "outbox")).await, 0);
    w.env.finish().await;
}

#[tokio::test]
async fn an_event_the_broker_refuses_is_published_again_until_confirmed_and_the_message_acknowledged()
 {
    let mut w = World::new(76).await;
    let mut to_gp = w.gp.listen(&format!("gp.{GP}")).await.unwrap();
    let mut to_sepp = w.sepp.listen(&format!("sepp.{SEPP}")).await.unwrap();
    // A full queue that refuses what it is given, bound to the SEPP's routing key: the broker
    // still delivers the SEPP's event to the SEPP's own queue, but answers its publish with a
    // nack, as it would for a queue over its length limit.
    let (_operator, channel) = operator_channel(&w).await;
    let mut refusing = FieldTable::default();
    refusing.insert("x-max-length".into(), AMQPValue::LongInt(0));
    refusing.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare("full", QueueDeclareOptions::default(), refusing)
        .await
        .unwrap();
    channel
        .queue_bind(
            "full",
            "trio.outbound",
            &format!("sepp.{SEPP}"),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let body = trajet(&w.niss, "refused", "rtw_ami", "en_cours", 1);
    let r = request_with_id(&mut w.oa, "oa", "trajet.upsert", "m-refused", &body).await;
    assert_reply(&r, "accepted", None);
    assert_eq!(to_gp.drain(Duration::from_secs(1)).await.unwrap().len(), 1);

    // The refused event is kept in the outbox, due at once, and the sweeper tries it again
    // (each claim counts an attempt; the insert after the first refusal counted one) ...
    let mut attempts = 0;
    for _ in 0..100 {
        attempts = sqlx::query_scalar::<_, i32>(
            "SELECT COALESCE(max(attempts), 0) FROM outbox WHERE routing_key = $1",
        )
        .bind(format!("sepp.{SEPP}"))
        .fetch_one(&w.env.db)
        .await
        .unwrap();
        if attempts >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        attempts >= 3,
        "the refused event was retried ({attempts} attempts)"
    );
    assert_eq!(
        count(&w.env, "outbox").await,
        1,
        "only the refused event waits"
    );
    // ... while the inbound message is acknowledged: nothing left in its queue, not even unacked.
    let waiting = settles_to_zero(|| queue_depth(&w.env, "trio.inbound.oa")).await;
    assert_eq!(waiting, 0, "the message was acknowledged");

    // Once the broker accepts it, the next attempt is confirmed and the row deleted.
    channel
        .queue_delete("full", QueueDeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(settles_to_zero(|| count(&w.env, "outbox")).await, 0);
    // The SEPP got the event once per attempt the broker routed, always under one message id,
    // so it can tell the copies apart from new events.
    let got = to_sepp.drain(Duration::from_secs(2)).await.unwrap();
    assert!(
        got.len() >= 2,
        "the event was published again after the refusal"
    );
    let ids: BTreeSet<_> = got
        .iter()
        .map(|d| d.properties.message_id().clone())
        .collect();
    assert_eq!(ids.len(), 1, "one message id for every copy: {ids:?}");
    assert!(
        got.iter().all(|d| {
            d.properties.kind().as_ref().map(|k| k.as_str()) == Some("trajet.updated")
        })
    );
    w.env.finish().await;
}

#[tokio::test]
async fn a_committed_message_the_broker_dead_lettered_publishes_its_events_when_replayed() {
    let Waiting {
        mut w,
        ctx,
        mut to_sepp,
        mut to_gp,
        body,
    } = oa_upsert_waiting(77, "dead", "m-dead").await;
    // A gateway commits the message (applied here as it would) ...
    let caused = commit_without_publishing(&ctx, "m-dead", &body).await;
    // ... and never acknowledges it, delivery after delivery, until the inbound queue's
    // `x-delivery-limit` makes the broker dead-letter it.
    let (connection, channel) = operator_channel(&w).await;
    let mut dead = 0;
    for _ in 0..200 {
        // A passive declare counts the ready messages exactly (the management API lags).
        dead = channel
            .queue_declare(
                "trio.dead",
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count();
        if dead == 1 {
            break;
        }
        let got = channel
            .basic_get("trio.inbound.oa", BasicGetOptions { no_ack: false })
            .await
            .unwrap();
        match got {
            Some(message) => channel
                .basic_nack(
                    message.delivery.delivery_tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await
                .unwrap(),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(dead, 1, "the broker dead-lettered the message");
    connection.close(200, "done").await.unwrap();
    let letters = trio_gateway::dlq::list(&w.env.config, 10).await.unwrap();
    assert_eq!(letters[0].error, "delivery_limit (broker)");

    // The operator replays it once a gateway runs: it is a duplicate, and what it caused goes
    // out again, with the ids the commit gave it.
    w.env.start_gateway();
    let replayed = trio_gateway::dlq::replay(
        &w.env.config,
        &trio_gateway::dlq::Selection::Id("m-dead".into()),
    )
    .await
    .unwrap();
    assert_eq!(replayed, 1);
    let reply = w.oa.reply_to("m-dead", WAIT).await.unwrap();
    assert_eq!(reply.body["status"], "duplicate");
    assert_eq!(
        events_received(&mut to_sepp, &mut to_gp).await,
        caused,
        "the events the commit caused"
    );
    assert_eq!(settles_to_zero(|| count(&w.env, "outbox")).await, 0);
    assert_eq!(version_of(&w, "dead").await, 1, "applied once");
    w.env.finish().await;
}
