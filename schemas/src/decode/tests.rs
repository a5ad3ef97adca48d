//! Unit tests of the decode step: both forms, duplicates, limits, DTDs, sanitised details.

use super::*;
use crate::message::{Consent, Format, TrajetType};
use time::macros::datetime;

/// Valid modulo-97 test NISS numbers.
const NISS_A: &str = "85073003328";
const NISS_B: &str = "90011512363";

fn json(t: MessageType, body: &str) -> Result<Message, DecodeError> {
    decode(t, ContentType::Json, body.as_bytes())
}

fn xml(t: MessageType, inner: &str) -> Result<Message, DecodeError> {
    let root = t.xml_root();
    let body = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><{root} xmlns="urn:be:trio:gateway:v1">{inner}</{root}>"#
    );
    decode(t, ContentType::Xml, body.as_bytes())
}

fn invalid(r: Result<Message, DecodeError>) -> String {
    match r {
        Err(DecodeError::Invalid(d)) => d,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn trajet_json(trajet: &str) -> String {
    format!(r#"{{"niss":"{NISS_A}","trajet":{{{trajet}}}}}"#)
}

fn trajet_with(extra: &str) -> String {
    trajet_json(&format!(
        r#""ref":"T-1","type":"rtw_ami","status":"en_cours","version":1{extra}"#
    ))
}

// ---------------------------------------------------------------- content type

#[test]
fn content_type_parsing() {
    assert_eq!(
        ContentType::parse("application/json"),
        Some(ContentType::Json)
    );
    assert_eq!(
        ContentType::parse("Application/JSON; charset=utf-8"),
        Some(ContentType::Json)
    );
    assert_eq!(
        ContentType::parse(" application/xml ;charset=UTF-8"),
        Some(ContentType::Xml)
    );
    assert_eq!(
        ContentType::parse("APPLICATION/XML"),
        Some(ContentType::Xml)
    );
    assert_eq!(ContentType::parse("text/xml"), None);
    assert_eq!(ContentType::parse("text/plain"), None);
    assert_eq!(ContentType::parse(""), None);
    assert_eq!(ContentType::Json.as_str(), "application/json");
}

// ---------------------------------------------------------------- each type, both forms

#[test]
fn organisation_upsert_json_and_xml_agree() {
    let j = json(
        MessageType::OrganisationUpsert,
        r#"{"id":"0411234567","kind":"sepp","name":"Mensura & co","broker_user":"sepp-mensura","format":"xml"}"#,
    )
    .expect("valid");
    let x = xml(
        MessageType::OrganisationUpsert,
        "<id>0411234567</id><kind>sepp</kind><name>Mensura &amp; co</name><broker_user>sepp-mensura</broker_user><format>xml</format>",
    )
    .expect("valid");
    assert_eq!(j, x);
    let Message::OrganisationUpsert(o) = j else {
        panic!("wrong variant")
    };
    assert_eq!(o.kind, OrgKind::Sepp);
    assert_eq!(o.format, Format::Xml);
    assert_eq!(o.name, "Mensura & co");
}

#[test]
fn relation_set_every_kind_json_and_xml_agree() {
    let cases = [
        (
            format!(r#"{{"kind":"insured_oa","niss":"{NISS_A}","oa":"300"}}"#),
            format!("<kind>insured_oa</kind><niss>{NISS_A}</niss><oa>300</oa>"),
        ),
        (
            format!(r#"{{"kind":"insured_employer","niss":"{NISS_A}","employer":"0206730011"}}"#),
            format!(
                "<kind>insured_employer</kind><niss>{NISS_A}</niss><employer>0206730011</employer>"
            ),
        ),
        (
            r#"{"kind":"employer_sepp","employer":"0206730011","sepp":"0411234567"}"#.to_owned(),
            "<kind>employer_sepp</kind><employer>0206730011</employer><sepp>0411234567</sepp>"
                .to_owned(),
        ),
        (
            format!(r#"{{"kind":"insured_gp","niss":"{NISS_A}","gp":"12345678901"}}"#),
            format!("<kind>insured_gp</kind><niss>{NISS_A}</niss><gp>12345678901</gp>"),
        ),
        (
            format!(r#"{{"kind":"insured_rp","niss":"{NISS_A}","rp":"0206730011"}}"#),
            format!("<kind>insured_rp</kind><niss>{NISS_A}</niss><rp>0206730011</rp>"),
        ),
        (
            format!(r#"{{"kind":"insured_deceased","niss":"{NISS_A}","died_on":"2024-02-29"}}"#),
            format!(
                "<kind>insured_deceased</kind><niss>{NISS_A}</niss><died_on>2024-02-29</died_on>"
            ),
        ),
        (
            format!(r#"{{"kind":"niss_replaced","old_niss":"{NISS_A}","new_niss":"{NISS_B}"}}"#),
            format!(
                "<kind>niss_replaced</kind><old_niss>{NISS_A}</old_niss><new_niss>{NISS_B}</new_niss>"
            ),
        ),
    ];
    for (rj, rx) in &cases {
        let j =
            json(MessageType::RelationSet, &format!(r#"{{"relation":{rj}}}"#)).expect("valid json");
        let x = xml(
            MessageType::RelationSet,
            &format!("<relation>{rx}</relation>"),
        )
        .expect("valid xml");
        assert_eq!(j, x, "{rj}");
        let uj = json(
            MessageType::RelationUnset,
            &format!(r#"{{"relation":{rj}}}"#),
        )
        .expect("valid json");
        let ux = xml(
            MessageType::RelationUnset,
            &format!("<relation>{rx}</relation>"),
        )
        .expect("valid xml");
        assert_eq!(uj, ux, "{rj}");
        assert_eq!(uj.message_type(), MessageType::RelationUnset);
    }
}

#[test]
fn relation_set_valid_until_both_forms() {
    let j = json(
        MessageType::RelationSet,
        &format!(r#"{{"relation":{{"kind":"insured_oa","niss":"{NISS_A}","oa":"300"}},"valid_until":"2030-01-02T03:04:05+01:00"}}"#),
    )
    .expect("valid");
    let x = xml(
        MessageType::RelationSet,
        &format!("<relation><kind>insured_oa</kind><niss>{NISS_A}</niss><oa>300</oa></relation><valid_until>2030-01-02T03:04:05+01:00</valid_until>"),
    )
    .expect("valid");
    assert_eq!(j, x);
    let Message::RelationSet(r) = j else {
        panic!("wrong variant")
    };
    assert_eq!(r.valid_until, Some(datetime!(2030-01-02 03:04:05 +01:00)));
    match r.relation {
        Relation::InsuredOa { niss, oa } => {
            assert_eq!(niss.expose(), NISS_A);
            assert_eq!(oa, "300");
        }
        other => panic!("wrong relation {other:?}"),
    }
}

#[test]
fn dossier_open_json_and_xml_agree() {
    let j = json(MessageType::DossierOpen, r#"{"niss":"85.07.30-033.28"}"#).expect("valid");
    let x = xml(MessageType::DossierOpen, "<niss>85.07.30-033.28</niss>").expect("valid");
    assert_eq!(j, x);
}

#[test]
fn trajet_upsert_json_and_xml_agree() {
    let j = json(
        MessageType::TrajetUpsert,
        &trajet_with(r#","request_received_on":"2025-01-15","start_on":"2025-02-01","end_on":"2025-06-30","consent":"given""#),
    )
    .expect("valid");
    let x = xml(
        MessageType::TrajetUpsert,
        &format!("<niss>{NISS_A}</niss><trajet><ref>T-1</ref><type>rtw_ami</type><status>en_cours</status><version>1</version><request_received_on>2025-01-15</request_received_on><start_on>2025-02-01</start_on><end_on>2025-06-30</end_on><consent>given</consent></trajet>"),
    )
    .expect("valid");
    assert_eq!(j, x);
    let Message::TrajetUpsert(t) = j else {
        panic!("wrong variant")
    };
    assert_eq!(t.trajet.trajet_type, TrajetType::RtwAmi);
    assert_eq!(t.trajet.consent, Some(Consent::Given));
    assert_eq!(t.trajet.start_on, Some(date!(2025 - 02 - 01)));
    assert_eq!(t.trajet.reference, "T-1");
}

#[test]
fn optional_fields_absent_and_null() {
    let a = json(MessageType::TrajetUpsert, &trajet_with("")).expect("valid");
    let b = json(
        MessageType::TrajetUpsert,
        &trajet_with(r#","start_on":null,"consent":null"#),
    )
    .expect("valid");
    assert_eq!(a, b);
    let Message::TrajetUpsert(t) = a else {
        panic!("wrong variant")
    };
    assert_eq!(t.trajet.start_on, None);
    assert_eq!(t.trajet.consent, None);
}

#[test]
fn unimplemented_type_is_invalid() {
    let d = invalid(json(MessageType::ConsentSet, "{}"));
    assert_eq!(d, "type not supported by this gateway version");
}

// ---------------------------------------------------------------- duplicates, unknown fields

#[test]
fn duplicate_keys_are_invalid() {
    let top = format!(r#"{{"niss":"{NISS_A}","niss":"{NISS_B}"}}"#);
    let d = invalid(json(MessageType::DossierOpen, &top));
    assert!(d.contains("duplicated key"), "{d}");
    let nested =
        trajet_json(r#""ref":"T","ref":"U","type":"rtw_ami","status":"en_cours","version":1"#);
    let d = invalid(json(MessageType::TrajetUpsert, &nested));
    assert!(d.contains("trajet"), "{d}");
    let in_unknown = format!(r#"{{"niss":"{NISS_A}","extra":{{"a":[{{"b":1,"b":2}}]}}}}"#);
    invalid(json(MessageType::DossierOpen, &in_unknown));
}

#[test]
fn duplicate_elements_are_invalid() {
    let d = invalid(xml(
        MessageType::DossierOpen,
        &format!("<niss>{NISS_A}</niss><niss>{NISS_B}</niss>"),
    ));
    assert!(d.contains("duplicated element `niss`"), "{d}");
    assert!(!d.contains(NISS_A) && !d.contains(NISS_B));
    let d = invalid(xml(
        MessageType::TrajetUpsert,
        &format!("<niss>{NISS_A}</niss><trajet><ref>a</ref><ref>b</ref></trajet>"),
    ));
    assert!(d.contains("trajet"), "{d}");
}

#[test]
fn unknown_fields_are_ignored() {
    let j = json(
        MessageType::DossierOpen,
        &format!(r#"{{"niss":"{NISS_A}","future":{{"x":[1,2]}},"note":"hi"}}"#),
    )
    .expect("valid");
    let x = xml(
        MessageType::DossierOpen,
        &format!("<niss>{NISS_A}</niss><future><x>1</x></future><note>hi</note>"),
    )
    .expect("valid");
    assert_eq!(j, x);
    let nested = trajet_with(r#","colour":"blue""#);
    json(MessageType::TrajetUpsert, &nested).expect("unknown nested field ignored");
}

// ---------------------------------------------------------------- limits

#[test]
fn ref_length_boundaries() {
    let ok = "r".repeat(64);
    let long = "r".repeat(65);
    let body = |r: &str| {
        trajet_json(&format!(
            r#""ref":"{r}","type":"rtw_ami","status":"en_cours","version":1"#
        ))
    };
    json(MessageType::TrajetUpsert, &body(&ok)).expect("64 chars ok");
    // 64 characters, more bytes: characters count, not bytes.
    json(MessageType::TrajetUpsert, &body(&"é".repeat(64))).expect("64 chars ok");
    let d = invalid(json(MessageType::TrajetUpsert, &body(&long)));
    assert!(d.contains("trajet.ref"), "{d}");
    invalid(json(MessageType::TrajetUpsert, &body("")));
    invalid(json(MessageType::TrajetUpsert, &body("a\\u0007b")));
}

fn org(id: &str, kind: &str, name: &str, user: &str) -> Result<Message, DecodeError> {
    json(
        MessageType::OrganisationUpsert,
        &format!(
            r#"{{"id":"{id}","kind":"{kind}","name":"{name}","broker_user":"{user}","format":"json"}}"#
        ),
    )
}

#[test]
fn organisation_limits() {
    org("300", "oa", "OA", "u").expect("ok");
    org("0411234567", "sepp", "S", "u").expect("ok");
    org("0206730011", "rp", "R", "u").expect("ok");
    org("12345678901", "gp", "G", "u").expect("ok");
    for (id, kind) in [
        ("30", "oa"),
        ("3000", "oa"),
        ("30a", "oa"),
        ("041123456", "sepp"),
        ("04112345678", "rp"),
        ("1234567890", "gp"),
        ("300", "sepp"),
    ] {
        let d = invalid(org(id, kind, "N", "u"));
        assert!(d.contains("`id`"), "{id} {kind}: {d}");
    }
    org("300", "oa", &"n".repeat(200), "u").expect("200 ok");
    let d = invalid(org("300", "oa", &"n".repeat(201), "u"));
    assert!(d.contains("`name`"), "{d}");
    invalid(org("300", "oa", "", "u"));
    org("300", "oa", "N", &"u".repeat(64)).expect("64 ok");
    let d = invalid(org("300", "oa", "N", &"u".repeat(65)));
    assert!(d.contains("`broker_user`"), "{d}");
    invalid(org("300", "oa", "N", ""));
    let d = invalid(org("300", "bank", "N", "u"));
    assert!(d.contains("kind"), "{d}");
    invalid(json(
        MessageType::OrganisationUpsert,
        r#"{"id":"300","kind":"oa","name":"N","broker_user":"u","format":"yaml"}"#,
    ));
}

#[test]
fn relation_org_id_limits() {
    let rel = |r: &str| json(MessageType::RelationSet, &format!(r#"{{"relation":{r}}}"#));
    for bad in [
        format!(r#"{{"kind":"insured_oa","niss":"{NISS_A}","oa":"3000"}}"#),
        format!(r#"{{"kind":"insured_employer","niss":"{NISS_A}","employer":"020673001"}}"#),
        r#"{"kind":"employer_sepp","employer":"0206730011","sepp":"041123456x"}"#.to_owned(),
        format!(r#"{{"kind":"insured_gp","niss":"{NISS_A}","gp":"1234567890"}}"#),
        format!(r#"{{"kind":"insured_rp","niss":"{NISS_A}","rp":"02067300111"}}"#),
    ] {
        let d = invalid(rel(&bad));
        assert!(d.contains("relation."), "{d}");
    }
    let d = invalid(rel(r#"{"kind":"friend_of","a":"b"}"#));
    assert!(d.contains("relation"), "{d}");
    invalid(rel(&format!(
        r#"{{"kind":"insured_oa","niss":"{NISS_A}"}}"#
    )));
}

#[test]
fn valid_until_refused_on_facts() {
    for r in [
        format!(r#"{{"kind":"insured_deceased","niss":"{NISS_A}","died_on":"2024-01-01"}}"#),
        format!(r#"{{"kind":"niss_replaced","old_niss":"{NISS_A}","new_niss":"{NISS_B}"}}"#),
    ] {
        let body = format!(r#"{{"relation":{r},"valid_until":"2030-01-01T00:00:00Z"}}"#);
        let d = invalid(json(MessageType::RelationSet, &body));
        assert!(d.contains("valid_until"), "{d}");
        json(MessageType::RelationSet, &format!(r#"{{"relation":{r}}}"#)).expect("fact ok");
    }
    let d = invalid(json(
        MessageType::RelationSet,
        &format!(
            r#"{{"relation":{{"kind":"insured_oa","niss":"{NISS_A}","oa":"300"}},"valid_until":"tomorrow"}}"#
        ),
    ));
    assert!(d.contains("valid_until"), "{d}");
}

#[test]
fn version_boundaries() {
    let body = |v: &str| {
        trajet_json(&format!(
            r#""ref":"T","type":"rtw_ami","status":"en_cours","version":{v}"#
        ))
    };
    invalid(json(MessageType::TrajetUpsert, &body("0")));
    invalid(json(MessageType::TrajetUpsert, &body("-1")));
    json(MessageType::TrajetUpsert, &body("1")).expect("1 ok");
    json(MessageType::TrajetUpsert, &body("9007199254740991")).expect("2^53-1 ok");
    let d = invalid(json(MessageType::TrajetUpsert, &body("9007199254740992")));
    assert!(d.contains("trajet.version"), "{d}");
    assert!(!d.contains("9007199254740992"), "{d}");
    invalid(json(
        MessageType::TrajetUpsert,
        &body("18446744073709551616"),
    ));
    invalid(json(MessageType::TrajetUpsert, &body("1.5")));
    invalid(json(MessageType::TrajetUpsert, &body("\"1\"")));
    let xbody = |v: &str| {
        format!(
            "<niss>{NISS_A}</niss><trajet><ref>T</ref><type>rtw_ami</type><status>en_cours</status><version>{v}</version></trajet>"
        )
    };
    xml(MessageType::TrajetUpsert, &xbody("9007199254740991")).expect("2^53-1 ok");
    invalid(xml(MessageType::TrajetUpsert, &xbody("9007199254740992")));
    invalid(xml(MessageType::TrajetUpsert, &xbody("0")));
    invalid(xml(MessageType::TrajetUpsert, &xbody("one")));
}

#[test]
fn date_boundaries() {
    let body = |d: &str| trajet_with(&format!(r#","start_on":"{d}""#));
    invalid(json(MessageType::TrajetUpsert, &body("1899-12-31")));
    json(MessageType::TrajetUpsert, &body("1900-01-01")).expect("ok");
    json(MessageType::TrajetUpsert, &body("2199-12-31")).expect("ok");
    let d = invalid(json(MessageType::TrajetUpsert, &body("2200-01-01")));
    assert!(d.contains("trajet.start_on"), "{d}");
    for bad in [
        "2025-02-30",
        "2025-2-01",
        "20250201",
        "+2025-02-01",
        "2025-02-01T00:00:00Z",
        "",
    ] {
        let d = invalid(json(MessageType::TrajetUpsert, &body(bad)));
        assert!(d.contains("start_on"), "{bad}: {d}");
    }
    let died = |d: &str| {
        json(
            MessageType::RelationSet,
            &format!(
                r#"{{"relation":{{"kind":"insured_deceased","niss":"{NISS_A}","died_on":"{d}"}}}}"#
            ),
        )
    };
    invalid(died("1899-12-31"));
    died("1900-01-01").expect("ok");
    died("2199-12-31").expect("ok");
    let d = invalid(died("2200-01-01"));
    assert!(d.contains("died_on"), "{d}");
}

#[test]
fn niss_length_bound() {
    json(
        MessageType::DossierOpen,
        &format!(r#"{{"niss":"{}"}}"#, "1".repeat(32)),
    )
    .expect("32 chars left to the handler");
    let d = invalid(json(
        MessageType::DossierOpen,
        &format!(r#"{{"niss":"{}"}}"#, "1".repeat(33)),
    ));
    assert!(d.contains("`niss`"), "{d}");
    // A syntactically odd but short NISS is the handler's business (`invalid_niss`).
    json(MessageType::DossierOpen, r#"{"niss":"12345"}"#).expect("short ok");
}

#[test]
fn invalid_details_never_echo_the_niss() {
    let bodies = [
        (MessageType::DossierOpen, format!(r#"{{"niss":{NISS_A}}}"#)),
        (
            MessageType::DossierOpen,
            format!(r#"{{"niss":["{NISS_A}"]}}"#),
        ),
        (
            MessageType::DossierOpen,
            format!(r#"{{"niss":"{NISS_A}","niss":"{NISS_A}"}}"#),
        ),
        (
            MessageType::DossierOpen,
            format!(r#"{{"niss":"{NISS_A}{NISS_A}{NISS_A}"}}"#),
        ),
        (
            MessageType::DossierOpen,
            format!(r#"{{"{NISS_A}":1,"{NISS_A}":2}}"#),
        ),
        (
            MessageType::RelationSet,
            format!(r#"{{"relation":{{"kind":"{NISS_A}","niss":"{NISS_A}"}}}}"#),
        ),
        (
            MessageType::RelationSet,
            format!(r#"{{"relation":{{"kind":"insured_oa","niss":"{NISS_A}","oa":"{NISS_A}"}}}}"#),
        ),
        (
            MessageType::RelationSet,
            format!(
                r#"{{"relation":{{"kind":"insured_oa","niss":"{NISS_A}","oa":"300"}},"valid_until":"{NISS_A}"}}"#
            ),
        ),
        (
            MessageType::TrajetUpsert,
            trajet_json(&format!(
                r#""ref":"T","type":"{NISS_A}","status":"s","version":1"#
            )),
        ),
        (
            MessageType::TrajetUpsert,
            trajet_json(&format!(
                r#""ref":"T","type":"rtw_ami","status":"s","version":{NISS_A}0000000"#
            )),
        ),
        (
            MessageType::TrajetUpsert,
            trajet_json(&format!(
                r#""ref":"T","type":"rtw_ami","status":"s","version":1,"start_on":"{NISS_A}"}}"#
            )),
        ),
        (
            MessageType::TrajetUpsert,
            trajet_json(&format!(
                r#""ref":"T","type":"rtw_ami","status":"s","version":1,"consent":"{NISS_A}""#
            )),
        ),
        (
            MessageType::OrganisationUpsert,
            format!(
                r#"{{"id":"{NISS_A}","kind":"oa","name":"n","broker_user":"u","format":"json"}}"#
            ),
        ),
    ];
    for (t, body) in &bodies {
        match json(*t, body) {
            Err(DecodeError::Invalid(d)) => {
                assert!(!d.contains(NISS_A), "{body} → {d}");
                assert!(!d.contains("85073"), "{body} → {d}");
            }
            Err(DecodeError::Unreadable(_)) => {}
            other => panic!("{body}: expected an error, got {other:?}"),
        }
    }
    let d = invalid(xml(
        MessageType::DossierOpen,
        &format!("<niss><digits>{NISS_A}</digits></niss>"),
    ));
    assert!(!d.contains(NISS_A), "{d}");
}

#[test]
fn sanitise_keeps_names_and_drops_values() {
    assert_eq!(sanitise("missing field `niss`"), "missing field `niss`");
    assert_eq!(
        sanitise(r#"invalid type: string "85073003328", expected i64"#),
        r#"invalid type: string "…", expected i64"#
    );
    assert_eq!(
        sanitise("invalid type: integer `85073003328`, expected a string"),
        "invalid type: integer `…`, expected a string"
    );
    assert_eq!(sanitise("bad 12345678 here"), "bad … here");
    assert_eq!(sanitise("open `quote 123"), "open `…");
}

// ---------------------------------------------------------------- unreadable and DTD

#[test]
fn non_utf8_is_unreadable() {
    let body = b"{\"niss\":\"\xff\xfe\"}";
    assert!(matches!(
        decode(MessageType::DossierOpen, ContentType::Json, body),
        Err(DecodeError::Unreadable(_))
    ));
    let body = b"<dossier_open xmlns=\"urn:be:trio:gateway:v1\"><niss>\xff</niss></dossier_open>";
    assert!(matches!(
        decode(MessageType::DossierOpen, ContentType::Xml, body),
        Err(DecodeError::Unreadable(_))
    ));
}

#[test]
fn truncated_bodies_are_unreadable() {
    for body in [
        format!(r#"{{"niss":"{NISS_A}""#),
        String::new(),
        "{".to_owned(),
        "not json".to_owned(),
        format!(r#"{{"niss":"{NISS_A}"}} trailing"#),
    ] {
        let got = json(MessageType::DossierOpen, &body);
        assert!(
            matches!(got, Err(DecodeError::Unreadable(_))),
            "{body}: {got:?}"
        );
    }
    for body in [
        format!(r#"<dossier_open xmlns="urn:be:trio:gateway:v1"><niss>{NISS_A}</niss>"#),
        format!(r#"<dossier_open xmlns="urn:be:trio:gateway:v1"><niss>{NISS_A}</ni"#),
        r#"<dossier_open xmlns="urn:be:trio:gateway:v1""#.to_owned(),
        String::new(),
    ] {
        let got = decode(MessageType::DossierOpen, ContentType::Xml, body.as_bytes());
        assert!(
            matches!(got, Err(DecodeError::Unreadable(_))),
            "{body}: {got:?}"
        );
    }
}

#[test]
fn non_object_json_is_invalid() {
    invalid(json(MessageType::DossierOpen, "[]"));
    invalid(json(MessageType::DossierOpen, "\"x\""));
    invalid(json(MessageType::DossierOpen, "null"));
}

#[test]
fn doctype_and_entity_are_refused() {
    for body in [
        r#"<?xml version="1.0"?><!DOCTYPE dossier_open><dossier_open xmlns="urn:be:trio:gateway:v1"><niss>1</niss></dossier_open>"#.to_owned(),
        r#"<!doctype dossier_open [<!ENTITY x "y">]><dossier_open xmlns="urn:be:trio:gateway:v1"><niss>&x;</niss></dossier_open>"#.to_owned(),
        r#"<dossier_open xmlns="urn:be:trio:gateway:v1"><!ENTITY x "y"><niss>1</niss></dossier_open>"#.to_owned(),
        // Refused before the UTF-8 check, too.
        "<!DOCTYPE x>\u{0}".to_owned(),
    ] {
        let got = decode(MessageType::DossierOpen, ContentType::Xml, body.as_bytes());
        assert_eq!(got, Err(DecodeError::DtdRefused), "{body}");
    }
    // A DOCTYPE inside a JSON string is just text.
    json(MessageType::DossierOpen, r#"{"niss":"<!DOCTYPE x>"}"#).expect("json text");
}

#[test]
fn wrong_root_or_namespace_is_invalid() {
    for body in [
        format!(
            r#"<dossier.open xmlns="urn:be:trio:gateway:v1"><niss>{NISS_A}</niss></dossier.open>"#
        ),
        format!(
            r#"<trajet_upsert xmlns="urn:be:trio:gateway:v1"><niss>{NISS_A}</niss></trajet_upsert>"#
        ),
        format!(r#"<dossier_open><niss>{NISS_A}</niss></dossier_open>"#),
        format!(
            r#"<dossier_open xmlns="urn:be:trio:gateway:v2"><niss>{NISS_A}</niss></dossier_open>"#
        ),
        format!(
            r#"<t:dossier_open xmlns:t="urn:other" xmlns="urn:be:trio:gateway:v1"><niss>{NISS_A}</niss></t:dossier_open>"#
        ),
    ] {
        let d = invalid(decode(
            MessageType::DossierOpen,
            ContentType::Xml,
            body.as_bytes(),
        ));
        assert!(d.contains("root element"), "{d}");
    }
}

#[test]
fn xml_shape_errors_are_invalid() {
    let d = invalid(xml(MessageType::DossierOpen, "<niss>1<x/>2</niss>"));
    assert!(d.contains("niss"), "{d}");
    invalid(xml(MessageType::DossierOpen, ""));
    invalid(xml(
        MessageType::TrajetUpsert,
        &format!("<niss>{NISS_A}</niss><trajet>flat</trajet>"),
    ));
    // Whitespace between elements is fine.
    let body = format!(
        "\n  <niss>{NISS_A}</niss>\n  <trajet>\n    <ref>T</ref>\n    <type>rtw_ami</type>\n    <status>en_cours</status>\n    <version> 7 </version>\n  </trajet>\n"
    );
    xml(MessageType::TrajetUpsert, &body).expect("pretty-printed ok");
}

/// The JSON samples of `samples/valid` and `samples/invalid` of the inbound types this version
/// decodes, with their message type.
fn json_samples() -> Vec<(String, MessageType, Vec<u8>)> {
    let mut samples = Vec::new();
    for sub in ["valid", "invalid"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("samples")
            .join(sub);
        for entry in std::fs::read_dir(&dir).expect("samples directory") {
            let path = entry.expect("dir entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).expect("name");
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            // `trajet.upsert.2` or `invalid-trajet.upsert-version-zero`
            let type_name = match stem.split('-').nth(1) {
                Some(t) => t.to_owned(),
                None => stem.rsplit_once('.').map_or(stem, |(t, _)| t).to_owned(),
            };
            // Outbound types have samples too; only inbound ones are decoded.
            let Some(message_type) = MessageType::parse(&type_name).filter(|t| t.is_implemented())
            else {
                continue;
            };
            let body = std::fs::read(&path).expect("sample");
            samples.push((name.to_owned(), message_type, body));
        }
    }
    samples
}

#[test]
fn the_json_shortcut_accepts_exactly_what_the_full_path_accepts_and_decodes_it_the_same() {
    let samples = json_samples();
    assert!(
        samples.len() > 30,
        "the samples were found: {}",
        samples.len()
    );
    for (name, message_type, body) in samples {
        let full = decode_fully(message_type, ContentType::Json, &body);
        let shortcut = valid_json_shortcut(message_type, &body);
        match full {
            Ok(message) => assert_eq!(shortcut, Some(message), "{name}"),
            Err(e) => assert!(shortcut.is_none(), "{name}: the full path says {e}"),
        }
    }
}

#[test]
fn the_json_shortcut_leaves_arrays_duplicates_and_trailing_text_to_the_full_path() {
    let trajet = trajet_with("");
    assert!(valid_json_shortcut(MessageType::TrajetUpsert, trajet.as_bytes()).is_some());
    let spaced = format!(" \n\t{trajet}");
    assert!(valid_json_shortcut(MessageType::TrajetUpsert, spaced.as_bytes()).is_some());
    // A struct deserializes from an array too, field by field; the contract wants an object.
    let array = format!(
        r#"["{NISS_A}", {{"ref": "T-1", "type": "rtw_ami", "status": "en_cours", "version": 1}}]"#
    );
    assert!(valid_json_shortcut(MessageType::TrajetUpsert, array.as_bytes()).is_none());
    assert!(matches!(
        json(MessageType::TrajetUpsert, &array),
        Err(DecodeError::Invalid(_))
    ));
    let duplicated = format!(r#"{{"niss": "{NISS_A}", "niss": "{NISS_B}"}}"#);
    assert!(valid_json_shortcut(MessageType::DossierOpen, duplicated.as_bytes()).is_none());
    let trailing = format!("{trajet} x");
    assert!(valid_json_shortcut(MessageType::TrajetUpsert, trailing.as_bytes()).is_none());
}
