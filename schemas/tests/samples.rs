//! Loads every sample payload under `schemas/samples` and checks the decoder's outcome and the
//! published JSON Schemas against it.
//!
//! - `samples/valid/<type>[.<n>].json|xml`: decodes (inbound types), the JSON and XML of the same
//!   stem decode to the same message, and the JSON validates against `json/<type>.schema.json`.
//! - `samples/invalid/<expect>-<type>-<what>.json|xml`, `<expect>` one of `unreadable`, `dtd`,
//!   `invalid`: decodes to that error; `invalid` JSON samples are also refused by the JSON Schema,
//!   except duplicated keys, which JSON Schema cannot see.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use trio_schemas::{ContentType, DecodeError, Message, MessageType, decode};

/// The types with published schema files.
const SCHEMA_TYPES: [&str; 7] = [
    "organisation.upsert",
    "relation.set",
    "relation.unset",
    "dossier.open",
    "trajet.upsert",
    "reply",
    "trajet.updated",
];

/// The valid modulo-97 test numbers the samples use.
const SAMPLE_NISS: [&str; 5] = [
    "85073003328",
    "90011512363",
    "75031245604",
    "62022818795",
    "01010100126",
];

fn dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(sub)
}

fn files(sub: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir(sub))
        .expect("samples directory")
        .map(|e| e.expect("dir entry").path())
        .collect();
    v.sort();
    v
}

fn name_of(p: &Path) -> &str {
    p.file_name().and_then(|n| n.to_str()).expect("utf-8 name")
}

fn content_type(p: &Path) -> ContentType {
    match p.extension().and_then(|e| e.to_str()) {
        Some("json") => ContentType::Json,
        Some("xml") => ContentType::Xml,
        other => panic!("unexpected sample extension {other:?} in {}", p.display()),
    }
}

/// `trajet.upsert.2.json` → (`trajet.upsert`, `trajet.upsert.2`).
fn valid_type_and_stem(p: &Path) -> (String, String) {
    let stem = p.file_stem().and_then(|s| s.to_str()).expect("stem");
    let ty = match stem.rsplit_once('.') {
        Some((head, n)) if n.chars().all(|c| c.is_ascii_digit()) => head,
        _ => stem,
    };
    (ty.to_owned(), stem.to_owned())
}

fn schema(ty: &str) -> jsonschema::Validator {
    let path = dir("json").join(format!("{ty}.schema.json"));
    let text = fs::read_to_string(&path).expect("schema file");
    let value: Value = serde_json::from_str(&text).expect("schema is JSON");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&value)
        .unwrap_or_else(|e| panic!("{}: not a valid schema: {e}", path.display()))
}

#[test]
fn every_type_has_its_schema_files() {
    for ty in SCHEMA_TYPES {
        assert!(
            dir("json").join(format!("{ty}.schema.json")).is_file(),
            "{ty}"
        );
        assert!(dir("xsd").join(format!("{ty}.xsd")).is_file(), "{ty}");
        schema(ty);
    }
    for t in MessageType::ALL.into_iter().filter(|t| t.is_implemented()) {
        assert!(SCHEMA_TYPES.contains(&t.as_str()), "{t} has no schema");
    }
}

#[test]
fn asyncapi_names_every_type_and_schema() {
    let text = fs::read_to_string(dir("asyncapi.yaml")).expect("asyncapi.yaml");
    for t in MessageType::ALL {
        assert!(text.contains(t.as_str()), "asyncapi.yaml does not name {t}");
    }
    for ty in SCHEMA_TYPES {
        assert!(
            text.contains(&format!("./json/{ty}.schema.json")),
            "asyncapi.yaml does not reference the schema of {ty}"
        );
    }
    for name in [
        "trio.inbound",
        "trio.inbound.oa",
        "trio.inbound.sepp",
        "trio.inbound.gp",
        "trio.inbound.rp",
        "trio.inbound.reference",
        "trio.outbound",
        "trio.dlx",
        "trio.dead",
        "x-trio-error",
    ] {
        assert!(text.contains(name), "asyncapi.yaml does not name {name}");
    }
}

#[test]
fn valid_samples_decode_and_match_their_schema() {
    let mut decoded: BTreeMap<String, Message> = BTreeMap::new();
    let mut seen_types = BTreeMap::<String, usize>::new();
    for path in files("samples/valid") {
        let (ty, stem) = valid_type_and_stem(&path);
        *seen_types.entry(ty.clone()).or_default() += 1;
        let body = fs::read(&path).expect("sample");
        let ct = content_type(&path);
        if let Some(t) = MessageType::parse(&ty) {
            let msg = decode(t, ct, &body).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
            assert_eq!(msg.message_type(), t);
            if let Some(other) = decoded.get(&stem) {
                assert_eq!(other, &msg, "{stem}: JSON and XML forms differ");
            } else {
                decoded.insert(stem.clone(), msg);
            }
        } else {
            assert!(
                SCHEMA_TYPES.contains(&ty.as_str()),
                "{}: unknown type",
                path.display()
            );
        }
        if ct == ContentType::Json {
            let value: Value = serde_json::from_slice(&body).expect("JSON sample");
            let v = schema(&ty);
            let errors: Vec<String> = v.iter_errors(&value).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        }
    }
    for ty in SCHEMA_TYPES {
        assert!(seen_types.contains_key(ty), "no valid sample of {ty}");
    }
}

#[test]
fn invalid_samples_fail_as_named() {
    let mut count = 0;
    for path in files("samples/invalid") {
        let name = name_of(&path).to_owned();
        let mut parts = name.splitn(3, '-');
        let (Some(expect), Some(ty), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
            panic!("{name}: expected <expect>-<type>-<what>.<ext>");
        };
        let t = MessageType::parse(ty).unwrap_or_else(|| panic!("{name}: unknown type {ty}"));
        let ct = content_type(&path);
        let body = fs::read(&path).expect("sample");
        let got = decode(t, ct, &body);
        match (expect, &got) {
            ("unreadable", Err(DecodeError::Unreadable(_))) => {}
            ("dtd", Err(DecodeError::DtdRefused)) => {}
            ("invalid", Err(DecodeError::Invalid(detail))) => {
                for niss in SAMPLE_NISS {
                    assert!(
                        !detail.contains(niss),
                        "{name}: detail leaks a NISS: {detail}"
                    );
                }
                let longest_digit_run = detail
                    .split(|c: char| !c.is_ascii_digit())
                    .map(str::len)
                    .max()
                    .unwrap_or(0);
                assert!(
                    longest_digit_run < 5,
                    "{name}: detail has a long number: {detail}"
                );
            }
            _ => panic!("{name}: expected {expect}, got {got:?}"),
        }
        if expect == "invalid" && ct == ContentType::Json && !name.contains("duplicate") {
            let value: Value = serde_json::from_slice(&body).expect("well-formed");
            assert!(
                !schema(ty).is_valid(&value),
                "{name}: the JSON Schema accepts it"
            );
        }
        count += 1;
    }
    assert!(count >= 20, "only {count} invalid samples");
}
