//! The mechanical JSON ↔ XML mapping of CONTRACT.md §3 "XML form".
//!
//! - [`to_xml`] renders an outbound body (a JSON object) as XML, for organisations registered with
//!   `format: xml` (the publish step of the flow).
//! - `read` (crate-internal) turns an inbound XML body into the same [`serde_json::Value`] the
//!   JSON form would give, so that [`crate::decode()`] validates both forms on one code path.
//!
//! The mapping: root element = the type with `.` → `_`, in namespace [`NAMESPACE`]; each field is a
//! child element of the same name; nested objects nest; an array is an element of the field's name
//! holding one `<item>` per entry; a missing (or `null`) optional field is an absent element;
//! booleans are `true`/`false`.

use crate::decode::DecodeError;
use quick_xml::NsReader;
use quick_xml::escape::{escape, resolve_predefined_entity};
use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use serde_json::{Map, Value};

/// The XML namespace of every gateway message.
pub const NAMESPACE: &str = "urn:be:trio:gateway:v1";

/// The element name of one array entry.
const ITEM: &str = "item";

/// Renders `value` (normally a JSON object) as an XML document whose root element is `root`, in
/// namespace [`NAMESPACE`].
///
/// Object fields become child elements in the map's order (insertion order when serde_json's
/// `preserve_order` feature is on, otherwise alphabetical; the XSDs accept any order), nested objects nest, arrays become one
/// `<item>` child per entry, `null` fields (and `null` array entries) are omitted, numbers and
/// booleans are written as their JSON text, and text is escaped. Field names are written as they
/// are: they must be XML names (all the contract's field names are).
pub fn to_xml(root: &str, value: &Value) -> String {
    let mut out = String::from(r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    out.push('<');
    out.push_str(root);
    out.push_str(r#" xmlns=""#);
    out.push_str(NAMESPACE);
    out.push_str(r#"">"#);
    write_content(&mut out, value);
    out.push_str("</");
    out.push_str(root);
    out.push('>');
    out
}

/// Writes the content of an element holding `value` (not the element's own tags).
fn write_content(out: &mut String, value: &Value) {
    match value {
        Value::Null => {}
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => out.push_str(&escape(s.as_str())),
        Value::Array(items) => {
            for item in items.iter().filter(|v| !v.is_null()) {
                write_element(out, ITEM, item);
            }
        }
        Value::Object(fields) => {
            for (name, field) in fields.iter().filter(|(_, v)| !v.is_null()) {
                write_element(out, name, field);
            }
        }
    }
}

/// Writes `<name>content</name>`.
fn write_element(out: &mut String, name: &str, value: &Value) {
    out.push('<');
    out.push_str(name);
    out.push('>');
    write_content(out, value);
    out.push_str("</");
    out.push_str(name);
    out.push('>');
}

/// Which leaves of a message type are not strings: XML text carries no type, so the reader needs
/// to know which element paths hold numbers, booleans or (possibly empty) arrays. Paths are the
/// element names below the root joined by `/`, e.g. `trajet/version`; an array entry is `item`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Hints {
    /// Paths whose text is an integer.
    pub integers: &'static [&'static str],
    /// Paths whose text is a boolean (`true`/`false`, or `1`/`0` as in `xs:boolean`).
    pub booleans: &'static [&'static str],
    /// Paths that are arrays even when they hold no `<item>`.
    pub arrays: &'static [&'static str],
}

/// An element being read.
struct Frame {
    /// Local name.
    name: String,
    /// Path below the root (empty for the root).
    path: String,
    /// Child elements read so far, in order.
    children: Vec<(String, Value)>,
    /// Text content read so far (character data, CDATA and references).
    text: String,
}

impl Frame {
    fn new(name: String, parent: Option<&Frame>) -> Self {
        let path = match parent {
            None => String::new(),
            Some(p) if p.path.is_empty() => name.clone(),
            Some(p) => format!("{}/{}", p.path, name),
        };
        Frame {
            name,
            path,
            children: Vec::new(),
            text: String::new(),
        }
    }

    /// The JSON value of the finished element.
    fn finish(self, hints: &Hints) -> Result<Value, DecodeError> {
        let Frame {
            name,
            path,
            children,
            text,
        } = self;
        let shown = if path.is_empty() {
            name.as_str()
        } else {
            path.as_str()
        };
        if !children.is_empty() {
            if !text.trim().is_empty() {
                return Err(DecodeError::Invalid(format!(
                    "element `{shown}` mixes text and elements"
                )));
            }
            if children.iter().all(|(n, _)| n == ITEM) {
                return Ok(Value::Array(children.into_iter().map(|(_, v)| v).collect()));
            }
            let mut map = Map::with_capacity(children.len());
            for (child, value) in children {
                if map.contains_key(&child) {
                    return Err(DecodeError::Invalid(format!(
                        "duplicated element `{child}` in `{shown}`"
                    )));
                }
                map.insert(child, value);
            }
            return Ok(Value::Object(map));
        }
        let p = path.as_str();
        if hints.arrays.contains(&p) && text.trim().is_empty() {
            return Ok(Value::Array(Vec::new()));
        }
        if hints.integers.contains(&p) {
            let t = text.trim();
            if let Ok(n) = t.parse::<i64>() {
                return Ok(Value::from(n));
            }
            if let Ok(n) = t.parse::<u64>() {
                return Ok(Value::from(n));
            }
            return Err(DecodeError::Invalid(format!("`{shown}` is not an integer")));
        }
        if hints.booleans.contains(&p) {
            return match text.trim() {
                "true" | "1" => Ok(Value::Bool(true)),
                "false" | "0" => Ok(Value::Bool(false)),
                _ => Err(DecodeError::Invalid(format!("`{shown}` is not a boolean"))),
            };
        }
        Ok(Value::String(text))
    }
}

/// Whether the raw body contains a DOCTYPE or an entity declaration (ASCII case-insensitive).
fn has_dtd(body: &[u8]) -> bool {
    let contains = |needle: &[u8]| {
        body.windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
    };
    contains(b"<!doctype") || contains(b"<!entity")
}

/// Reads an inbound XML body into the JSON value of its payload.
///
/// # Errors
///
/// [`DecodeError::DtdRefused`] for a DOCTYPE or an entity declaration (checked first, on the raw
/// bytes too); [`DecodeError::Unreadable`] for a body that is not UTF-8 or not well-formed XML;
/// [`DecodeError::Invalid`] for a root element other than `root` in [`NAMESPACE`], an element with
/// both text and child elements, a duplicated child element, or a number/boolean leaf (per
/// `hints`) that does not parse. Child elements in another namespace are ignored, like unknown JSON
/// fields.
pub(crate) fn read(root: &str, body: &[u8], hints: &Hints) -> Result<Value, DecodeError> {
    if has_dtd(body) {
        return Err(DecodeError::DtdRefused);
    }
    let text = std::str::from_utf8(body)
        .map_err(|e| DecodeError::Unreadable(format!("XML body is not UTF-8: {e}")))?;
    let mut reader = NsReader::from_str(text);
    reader.config_mut().trim_text(false);
    let unreadable =
        |pos: u64| DecodeError::Unreadable(format!("XML not well-formed near byte {pos}"));

    let mut stack: Vec<Frame> = Vec::new();
    // Depth inside an ignored (foreign-namespace) element; 0 = not skipping.
    let mut skip: usize = 0;
    let mut result: Option<Value> = None;
    loop {
        let (ns, event) = match reader.read_resolved_event() {
            Ok(pair) => pair,
            Err(_) => return Err(unreadable(reader.error_position())),
        };
        let in_ns = matches!(ns, ResolveResult::Bound(n) if n.as_ref() == NAMESPACE.as_bytes());
        let unknown_prefix = matches!(ns, ResolveResult::Unknown(_));
        match event {
            Event::DocType(_) => return Err(DecodeError::DtdRefused),
            Event::Start(_) | Event::Empty(_) if unknown_prefix => {
                return Err(unreadable(reader.buffer_position()));
            }
            Event::Start(_) | Event::Empty(_) if result.is_some() => {
                // A second root element.
                return Err(unreadable(reader.buffer_position()));
            }
            Event::Start(_) if skip > 0 => skip += 1,
            Event::End(_) if skip > 0 => skip -= 1,
            Event::Empty(_) if skip > 0 => {}
            Event::Start(ref e) | Event::Empty(ref e) => {
                let local = std::str::from_utf8(e.local_name().into_inner())
                    .map_err(|_| unreadable(reader.buffer_position()))?
                    .to_owned();
                if stack.is_empty() {
                    if local != root || !in_ns {
                        return Err(DecodeError::Invalid(format!(
                            "root element must be `{root}` in namespace {NAMESPACE}"
                        )));
                    }
                } else if !in_ns {
                    if matches!(event, Event::Start(_)) {
                        skip = 1;
                    }
                    continue;
                }
                let frame = Frame::new(local, stack.last());
                if matches!(event, Event::Empty(_)) {
                    close(frame, &mut stack, &mut result, hints)?;
                } else {
                    stack.push(frame);
                }
            }
            Event::End(_) => match stack.pop() {
                Some(frame) => close(frame, &mut stack, &mut result, hints)?,
                None => return Err(unreadable(reader.buffer_position())),
            },
            Event::Text(t) => {
                let s = t
                    .xml10_content()
                    .map_err(|_| unreadable(reader.buffer_position()))?;
                match stack.last_mut() {
                    Some(frame) if skip == 0 => frame.text.push_str(&s),
                    Some(_) => {}
                    None if s.trim().is_empty() => {}
                    None => return Err(unreadable(reader.buffer_position())),
                }
            }
            Event::CData(c) => {
                let s = c
                    .xml10_content()
                    .map_err(|_| unreadable(reader.buffer_position()))?;
                match stack.last_mut() {
                    Some(frame) if skip == 0 => frame.text.push_str(&s),
                    Some(_) => {}
                    None => return Err(unreadable(reader.buffer_position())),
                }
            }
            Event::GeneralRef(r) => {
                let resolved: String = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    Ok(None) => {
                        let name = r
                            .decode()
                            .map_err(|_| unreadable(reader.buffer_position()))?;
                        match resolve_predefined_entity(&name) {
                            Some(s) => s.to_owned(),
                            // An undeclared entity: not well-formed (there is no DTD to declare it).
                            None => return Err(unreadable(reader.buffer_position())),
                        }
                    }
                    Err(_) => return Err(unreadable(reader.buffer_position())),
                };
                match stack.last_mut() {
                    Some(frame) if skip == 0 => frame.text.push_str(&resolved),
                    Some(_) => {}
                    None => return Err(unreadable(reader.buffer_position())),
                }
            }
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() || skip > 0 {
        return Err(unreadable(reader.buffer_position()));
    }
    result.ok_or_else(|| DecodeError::Unreadable("XML body has no root element".to_owned()))
}

/// Finishes `frame` and hands its value to its parent (or makes it the result, for the root).
fn close(
    frame: Frame,
    stack: &mut [Frame],
    result: &mut Option<Value>,
    hints: &Hints,
) -> Result<(), DecodeError> {
    let name = frame.name.clone();
    let value = frame.finish(hints)?;
    match stack.last_mut() {
        Some(parent) => parent.children.push((name, value)),
        None => *result = Some(value),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_shape_order_and_escaping() {
        // Keys in alphabetical order, so that the expected text holds whether or not serde_json's
        // `preserve_order` feature is on in the build.
        let v = json!({
            "absent": null,
            "dossier_number": "D-1",
            "list": ["x", null, 2],
            "pseudonym": "a<b>&\"c'",
            "trajet": {"ok": true, "owner": {"id": "300", "kind": "oa"}, "version": 3}
        });
        let xml = to_xml("trajet_updated", &v);
        assert_eq!(
            xml,
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?>"#,
                r#"<trajet_updated xmlns="urn:be:trio:gateway:v1">"#,
                "<dossier_number>D-1</dossier_number>",
                "<list><item>x</item><item>2</item></list>",
                "<pseudonym>a&lt;b&gt;&amp;&quot;c&apos;</pseudonym>",
                "<trajet><ok>true</ok><owner><id>300</id><kind>oa</kind></owner><version>3</version></trajet>",
                "</trajet_updated>"
            )
        );
    }

    #[test]
    fn renders_scalars_and_empty_objects() {
        assert_eq!(
            to_xml("r", &json!({})),
            r#"<?xml version="1.0" encoding="UTF-8"?><r xmlns="urn:be:trio:gateway:v1"></r>"#
        );
        let xml = to_xml("r", &json!({"n": -1.5, "b": false, "e": [], "o": {}}));
        assert!(xml.contains("<n>-1.5</n>"), "{xml}");
        assert!(xml.contains("<b>false</b>"), "{xml}");
        assert!(xml.contains("<e></e>"), "{xml}");
        assert!(xml.contains("<o></o>"), "{xml}");
    }

    #[test]
    fn reads_back_what_it_renders() {
        let v = json!({"a": "x & y", "b": {"c": "1", "d": ["p", "q"]}, "e": "  spaced  "});
        let xml = to_xml("t_x", &v);
        let back = read("t_x", xml.as_bytes(), &Hints::default()).expect("readable");
        assert_eq!(back, v);
    }

    #[test]
    fn hints_type_leaves() {
        let hints = Hints {
            integers: &["n"],
            booleans: &["b"],
            arrays: &["l"],
        };
        let xml = r#"<r xmlns="urn:be:trio:gateway:v1"><n>42</n><b>true</b><l/></r>"#;
        let v = read("r", xml.as_bytes(), &hints).expect("readable");
        assert_eq!(v, json!({"n": 42, "b": true, "l": []}));
        let bad = r#"<r xmlns="urn:be:trio:gateway:v1"><n>4x</n></r>"#;
        assert!(matches!(
            read("r", bad.as_bytes(), &hints),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn prefixed_root_cdata_refs_comments_and_foreign_elements() {
        let xml = r#"<?xml version="1.0"?><!-- hi --><t:r xmlns:t="urn:be:trio:gateway:v1" xmlns:o="urn:other"><t:a><![CDATA[<x>]]>&#65;&amp;</t:a><o:ext><o:deep/></o:ext></t:r>"#;
        let v = read("r", xml.as_bytes(), &Hints::default()).expect("readable");
        assert_eq!(v, json!({"a": "<x>A&"}));
    }

    #[test]
    fn not_well_formed_is_unreadable() {
        for bad in [
            "",
            "<r xmlns=\"urn:be:trio:gateway:v1\"><a>x</a>",
            "<r xmlns=\"urn:be:trio:gateway:v1\"><a>x</b></r>",
            "<r xmlns=\"urn:be:trio:gateway:v1\"/><r xmlns=\"urn:be:trio:gateway:v1\"/>",
            "<r xmlns=\"urn:be:trio:gateway:v1\">&nbsp;</r>",
            "<r xmlns=\"urn:be:trio:gateway:v1\"><p:a/></r>",
            "text<r xmlns=\"urn:be:trio:gateway:v1\"/>",
        ] {
            let got = read("r", bad.as_bytes(), &Hints::default());
            assert!(
                matches!(got, Err(DecodeError::Unreadable(_))),
                "{bad}: {got:?}"
            );
        }
    }

    #[test]
    fn dtd_detection_is_case_insensitive() {
        assert!(has_dtd(b"<!doctype r>"));
        assert!(has_dtd(b"<!DocType r>"));
        assert!(has_dtd(b"<!ENTITY"));
        assert!(has_dtd(b"x<!entity y"));
        assert!(!has_dtd(b"<r>doctype entity</r>"));
    }

    #[test]
    fn outbound_xml_samples_match_their_json() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/valid");
        let hints = Hints {
            integers: &["trajet/version"],
            ..Hints::default()
        };
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).expect("samples") {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if !(name.starts_with("trajet.updated.") && name.ends_with(".xml")) {
                continue;
            }
            let xml = std::fs::read(&path).expect("xml sample");
            let json_text =
                std::fs::read_to_string(path.with_extension("json")).expect("json twin");
            let json: Value = serde_json::from_str(&json_text).expect("json sample");
            let from_xml = read("trajet_updated", &xml, &hints).expect("readable");
            assert_eq!(from_xml, json, "{name}");
            let rendered = to_xml("trajet_updated", &json);
            let back = read("trajet_updated", rendered.as_bytes(), &hints).expect("readable");
            assert_eq!(back, json, "{name}");
            checked += 1;
        }
        assert!(checked > 0);
    }
}
