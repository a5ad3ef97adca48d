//! `trio-gateway demo`: a short, realistic scenario end to end, printed as it happens.
//!
//! It registers an OA, a SEPP (XML format) and a GP with their own broker users, relates one
//! insured to all three, then: the GP opens the dossier, the OA opens an RTW/AMI trajet, the SEPP
//! opens a CODEX reintegration, both change status — and shows each reply and what every
//! recipient received. It runs a gateway in-process against the configured broker and database.

use crate::admin::{self, BrokerAdmin};
use crate::config::{Config, SecretUrl};
use crate::partner::{Listener, Outgoing, Partner, synthetic_niss};
use crate::serve;
use anyhow::Context as _;
use serde_json::{Value, json};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use trio_pseudo::Pseudonymiser;

const OA: (&str, &str) = ("300", "trio-demo-oa-300");
const SEPP: (&str, &str) = ("0411234567", "trio-demo-sepp-0411234567");
const GP: (&str, &str) = ("12345678901", "trio-demo-gp-12345678901");
const EMPLOYER: &str = "0999999999";
const GATEWAY_USER: &str = "trio-demo-gateway";
const WAIT: Duration = Duration::from_secs(15);

/// Runs the demo, writing its story to `out`.
///
/// # Errors
/// When the broker, the management API or the database is unreachable.
pub async fn run(
    config: Config,
    pseudonymiser: Arc<dyn Pseudonymiser>,
    out: &mut (impl Write + Send),
) -> anyhow::Result<()> {
    let admin = BrokerAdmin::from_env()?;
    let vhost = admin::vhost_of(config.amqp_url.expose());
    // The gateway publishes dead letters with their sender's user_id: it needs `impersonator`.
    admin
        .ensure_user(GATEWAY_USER, GATEWAY_USER, "impersonator")
        .await
        .context("creating the demo gateway's broker user (is rabbitmq_management enabled?)")?;
    admin.grant(&vhost, GATEWAY_USER).await?;
    for (_, user) in [OA, SEPP, GP] {
        admin
            .ensure_user(user, user, "")
            .await
            .context("creating the demo's broker users (is rabbitmq_management enabled?)")?;
        admin.grant(&vhost, user).await?;
    }
    let operator_url = config.amqp_url.expose().to_owned();
    let gateway_config = Config {
        amqp_url: SecretUrl::new(admin::amqp_url_for(
            &operator_url,
            GATEWAY_USER,
            GATEWAY_USER,
            &vhost,
        )),
        ..config.clone()
    };
    let stop = CancellationToken::new();
    let gateway = tokio::spawn(serve::serve(gateway_config, pseudonymiser, {
        let stop = stop.clone();
        async move { stop.cancelled().await }
    }));
    let url_for = |user: &str| admin::amqp_url_for(&operator_url, user, user, &vhost);

    // Wait until the gateway has declared the topology.
    let mut operator = loop {
        let p = Partner::connect(&operator_url).await?;
        if let Ok(l) = p.listen("demo.probe").await {
            drop(l);
            break p;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let mut oa = Partner::connect(&url_for(OA.1)).await?;
    let mut sepp = Partner::connect(&url_for(SEPP.1)).await?;
    let mut gp = Partner::connect(&url_for(GP.1)).await?;
    let mut inboxes: Vec<(&str, Listener)> = vec![
        ("OA 300", oa.listen(&format!("oa.{}", OA.0)).await?),
        (
            "SEPP 0411234567",
            sepp.listen(&format!("sepp.{}", SEPP.0)).await?,
        ),
        ("GP 12345678901", gp.listen(&format!("gp.{}", GP.0)).await?),
    ];

    let run = uuid::Uuid::new_v4().simple().to_string();
    let run = &run[..8];
    let niss = synthetic_niss(u32::from_str_radix(&run[..6], 16).unwrap_or(7) % 16_000_000);
    writeln!(out, "TRIO gateway demo (run {run})\n")?;

    writeln!(
        out,
        "1. The operator registers three organisations and relates one insured to them."
    )?;
    let orgs = [
        json!({"id": OA.0, "kind": "oa", "name": "Mutualité Démo", "broker_user": OA.1, "format": "json"}),
        json!({"id": SEPP.0, "kind": "sepp", "name": "SEPP Démo", "broker_user": SEPP.1, "format": "xml"}),
        json!({"id": GP.0, "kind": "gp", "name": "Dr Demo", "broker_user": GP.1, "format": "json"}),
    ];
    let relations = [
        json!({"relation": {"kind": "insured_oa", "niss": niss, "oa": OA.0}}),
        json!({"relation": {"kind": "insured_employer", "niss": niss, "employer": EMPLOYER}}),
        json!({"relation": {"kind": "employer_sepp", "employer": EMPLOYER, "sepp": SEPP.0}}),
        json!({"relation": {"kind": "insured_gp", "niss": niss, "gp": GP.0}}),
    ];
    let mut step = 0;
    for body in &orgs {
        step += 1;
        send(
            &mut operator,
            out,
            "reference",
            "organisation.upsert",
            &format!("{run}-{step}"),
            body,
        )
        .await?;
    }
    for body in &relations {
        step += 1;
        send(
            &mut operator,
            out,
            "reference",
            "relation.set",
            &format!("{run}-{step}"),
            body,
        )
        .await?;
    }

    writeln!(
        out,
        "\n2. The GP looks the insured up (dossier.open creates the dossier)."
    )?;
    send(
        &mut gp,
        out,
        "gp",
        "dossier.open",
        &format!("{run}-gp-open"),
        &json!({"niss": niss}),
    )
    .await?;

    writeln!(
        out,
        "\n3. The OA opens an RTW/AMI trajet; the SEPP opens a CODEX reintegration; both move on."
    )?;
    let scenario = [
        ("oa", "rtw_ami", "en_cours", 1),
        ("sepp", "reintegration_codex", "en_cours", 1),
        ("oa", "rtw_ami", "en_cours_plan_reintegration", 2),
        ("sepp", "reintegration_codex", "accepte", 2),
    ];
    for (who, trajet_type, status, version) in scenario {
        let body = json!({"niss": niss, "trajet": {
            "ref": format!("{trajet_type}-{run}"), "type": trajet_type, "status": status,
            "version": version, "start_on": "2026-11-02", "consent": "given"}});
        let partner = if who == "oa" { &mut oa } else { &mut sepp };
        send(
            partner,
            out,
            who,
            "trajet.upsert",
            &format!("{run}-{who}-{version}"),
            &body,
        )
        .await?;
    }

    writeln!(
        out,
        "\n4. A stale update (version 1 again) changes nothing:"
    )?;
    let body = json!({"niss": niss, "trajet": {"ref": format!("rtw_ami-{run}"), "type": "rtw_ami", "status": "termine", "version": 1}});
    send(
        &mut oa,
        out,
        "oa",
        "trajet.upsert",
        &format!("{run}-oa-stale"),
        &body,
    )
    .await?;

    writeln!(out, "\n5. What each recipient received on trio.outbound:")?;
    for (name, listener) in &mut inboxes {
        let received = listener.drain(Duration::from_secs(2)).await?;
        writeln!(out, "\n   {name}: {} message(s)", received.len())?;
        for d in received {
            let content_type = d
                .properties
                .content_type()
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_default();
            let kind = d
                .properties
                .kind()
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_default();
            let body = String::from_utf8_lossy(&d.data);
            writeln!(out, "   - {kind} ({content_type}): {}", shorten(&body))?;
        }
    }
    writeln!(
        out,
        "\nThe NISS never left the partners' side in clear: the gateway stored and sent only pseudonyms."
    )?;
    stop.cancel();
    gateway.await.context("gateway task")??;
    Ok(())
}

async fn send(
    partner: &mut Partner,
    out: &mut (impl Write + Send),
    queue: &str,
    message_type: &str,
    message_id: &str,
    body: &Value,
) -> anyhow::Result<()> {
    partner
        .publish(&Outgoing::json(queue, message_type, message_id, body))
        .await?;
    let reply = partner.reply_to(message_id, WAIT).await?;
    let b = &reply.body;
    writeln!(
        out,
        "   {:<20} from {:<28} → {} {} {}",
        message_type,
        partner.user(),
        b["status"].as_str().unwrap_or("?"),
        b["code"].as_str().unwrap_or(""),
        shorten(&b["result"].to_string()),
    )?;
    Ok(())
}

/// Long pseudonyms are cut for display.
fn shorten(text: &str) -> String {
    let mut out = String::new();
    for part in text.split('"') {
        if part.len() > 60 {
            out.push_str(&part[..24]);
            out.push('…');
        } else {
            out.push_str(part);
        }
        out.push('"');
    }
    out.pop();
    out
}
