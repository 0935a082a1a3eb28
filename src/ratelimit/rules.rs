//! Rate limit rules in envoyproxy/ratelimit's YAML shape, and how a descriptor finds its rule.
//!
//! A rules file is `domain:` plus a tree of `descriptors:`, each entry a `key`, an optional
//! `value` (which may hold `*` wildcards) and an optional `rate_limit`. A request descriptor — a
//! list of (key, value) entries — walks that tree one level per entry. At each level the most
//! specific entry wins: the exact key and value, then a wildcard value in file order, then the
//! bare key. The descriptor matches only if every entry finds a node and the last node has a
//! `rate_limit` (so nesting depth equals the number of entries). Files that envoyproxy/ratelimit
//! accepts are accepted unchanged (README, "Where tollgate differs, on purpose", names the few
//! mistakes it refuses that envoyproxy/ratelimit lets through); anything malformed is refused with
//! the file and the path. A domain lives in one file, unless domains are merged
//! (`ratelimit.merge_domains`, envoyproxy/ratelimit's `MERGE_DOMAIN_CONFIG`): then each file's
//! top-level descriptors join the domain's, and a descriptor defined twice is still an error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::counter_key::push_part;
use crate::limiter::Algorithm;

/// Time unit of a limit, as in Envoy's `RateLimitResponse.RateLimit.Unit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    /// Window length in seconds (a month is 30 days, a year 365, as envoyproxy/ratelimit counts).
    pub fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Week => 7 * 86_400,
            Unit::Month => 30 * 86_400,
            Unit::Year => 365 * 86_400,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }
}

impl<'de> Deserialize<'de> for Unit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.to_ascii_lowercase().as_str() {
            "second" => Unit::Second,
            "minute" => Unit::Minute,
            "hour" => Unit::Hour,
            "day" => Unit::Day,
            "week" => Unit::Week,
            "month" => Unit::Month,
            "year" => Unit::Year,
            _ => {
                return Err(serde::de::Error::custom(format!(
                    "unknown unit {s:?}: use second, minute, hour, day, week, month or year"
                )));
            }
        })
    }
}

/// What a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleLimit {
    /// Always OK; never counted.
    Unlimited,
    /// `requests_per_unit` per `unit` (0 refuses everything).
    PerUnit { requests_per_unit: u64, unit: Unit },
}

/// A compiled `rate_limit` block with its descriptor's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub limit: RuleLimit,
    /// `rate_limit.name`, which `replaces` refers to.
    pub name: Option<String>,
    /// Names of rules this one replaces when both match one request.
    pub replaces: Vec<String>,
    /// Evaluate and count, but always answer OK.
    pub shadow_mode: bool,
    /// How hits are counted (a tollgate extension; unset: `ratelimit.algorithm`).
    pub algorithm: Option<Algorithm>,
    /// Where the rule is: `domain.key_value.key…`, for logs and metrics.
    pub id: String,
}

/// A descriptor's rule, and the counter its hits go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    pub rule: Arc<Rule>,
    /// Identifies the counter: the domain and each entry's key and value (the wildcard pattern
    /// instead of the value where a `share_threshold` wildcard matched), each part written as
    /// [`push_part`] does, so a long value is only a digest here.
    pub counter_key: String,
}

/// A rules problem: which file, where in it, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rate limit rules in {file}: {path}: {message}", file = file.display())]
pub struct RulesError {
    pub file: PathBuf,
    pub path: String,
    pub message: String,
}

/// Every domain's rules.
#[derive(Debug, Default, Clone)]
pub struct Rules {
    domains: HashMap<String, Level>,
}

#[derive(Debug, Default, Clone)]
struct Level {
    /// key → value → node.
    exact: HashMap<String, HashMap<String, Node>>,
    /// (key, pattern, node), in file order.
    wildcard: Vec<(String, Pattern, Node)>,
    /// key → node, for entries without a value.
    any: HashMap<String, Node>,
}

#[derive(Debug, Clone)]
struct Node {
    rule: Option<Arc<Rule>>,
    share_threshold: bool,
    children: Level,
}

/// A value with `*` wildcards, each matching zero or more characters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    text: String,
    parts: Vec<String>,
}

impl Pattern {
    fn new(text: &str) -> Pattern {
        Pattern {
            text: text.to_string(),
            parts: text.split('*').map(str::to_string).collect(),
        }
    }

    fn matches(&self, value: &str) -> bool {
        let (first, rest) = self.parts.split_first().expect("split yields one part");
        let Some(mut tail) = value.strip_prefix(first.as_str()) else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            return tail.is_empty();
        };
        for part in middle {
            match tail.find(part.as_str()) {
                Some(at) => tail = &tail[at + part.len()..],
                None => return false,
            }
        }
        tail.len() >= last.len() && tail.ends_with(last.as_str())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    domain: String,
    #[serde(default)]
    descriptors: Vec<DescriptorDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DescriptorDoc {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    rate_limit: Option<RateLimitDoc>,
    #[serde(default)]
    descriptors: Vec<DescriptorDoc>,
    #[serde(default)]
    shadow_mode: bool,
    #[serde(default)]
    detailed_metric: bool,
    #[serde(default)]
    value_to_metric: bool,
    #[serde(default)]
    share_threshold: bool,
    /// Free-form data for the descriptor. envoyproxy/ratelimit returns it only in dynamic
    /// metadata, behind its `RESPONSE_DYNAMIC_METADATA` setting, which tollgate does not offer:
    /// accepted (it must be a mapping) and otherwise unused.
    #[serde(default, rename = "metadata")]
    _metadata: Option<serde_yaml::Mapping>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitDoc {
    #[serde(default)]
    unit: Option<Unit>,
    #[serde(default)]
    requests_per_unit: Option<u64>,
    #[serde(default)]
    unlimited: bool,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    replaces: Vec<ReplaceDoc>,
    /// tollgate's extension: fixed_window, sliding_window or token_bucket.
    #[serde(default)]
    algorithm: Option<Algorithm>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplaceDoc {
    /// Optional here so that a missing name is reported as empty, as envoyproxy/ratelimit does.
    #[serde(default)]
    name: Option<String>,
}

impl Rules {
    /// Loads a rules file, or every `.yaml`/`.yml` file under a directory (recursively, skipping
    /// hidden entries such as the `..data` links of a Kubernetes ConfigMap mount), in file name
    /// order. `merge_domains`: a domain may be defined in several files (see [`Rules::from_texts`]).
    pub fn load(path: &Path, merge_domains: bool) -> Result<Rules, RulesError> {
        let files = rule_files(path).map_err(|e| RulesError {
            file: path.to_path_buf(),
            path: "(file)".into(),
            message: format!("cannot read: {e}"),
        })?;
        let mut texts = Vec::with_capacity(files.len());
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| RulesError {
                file: f.clone(),
                path: "(file)".into(),
                message: format!("cannot read: {e}"),
            })?;
            texts.push((f, text));
        }
        Self::from_texts(
            texts.iter().map(|(f, t)| (f.as_path(), t.as_str())),
            merge_domains,
        )
    }

    /// Compiles rules from (file name, YAML text) pairs, in order. Without `merge_domains` a
    /// domain may appear in one file only. With it, a file naming a domain already loaded adds its
    /// top-level descriptors to that domain's; one whose key and value are already there is an
    /// error in the later file, as in envoyproxy/ratelimit (so a descriptor's subtree always comes
    /// from one file).
    pub fn from_texts<'a>(
        files: impl IntoIterator<Item = (&'a Path, &'a str)>,
        merge_domains: bool,
    ) -> Result<Rules, RulesError> {
        let mut rules = Rules::default();
        let mut seen: HashMap<String, Vec<PathBuf>> = HashMap::new();
        for (file, text) in files {
            let fail = |path: String, message: String| RulesError {
                file: file.to_path_buf(),
                path,
                message,
            };
            let doc: FileDoc =
                serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text))
                    .map_err(|e| {
                        let path = e.path().to_string();
                        let inner = e.into_inner();
                        let path = if path == "." {
                            inner
                                .location()
                                .map(|l| format!("line {} column {}", l.line(), l.column()))
                                .unwrap_or(path)
                        } else {
                            path
                        };
                        fail(path, inner.to_string())
                    })?;
            if doc.domain.is_empty() {
                return Err(fail("domain".into(), "must not be empty".into()));
            }
            let earlier = seen.entry(doc.domain.clone()).or_default();
            let merged_from = (!earlier.is_empty()).then(|| {
                earlier
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            });
            if let Some(others) = &merged_from
                && !merge_domains
            {
                return Err(fail(
                    "domain".into(),
                    format!(
                        "{:?} is also defined in {others} (set ratelimit.merge_domains to merge \
                         a domain from several files)",
                        doc.domain
                    ),
                ));
            }
            earlier.push(file.to_path_buf());
            let level = rules.domains.entry(doc.domain.clone()).or_default();
            compile_level(
                level,
                &doc.descriptors,
                "descriptors",
                &doc.domain,
                merged_from
                    .as_deref()
                    .map(|others| (doc.domain.as_str(), others)),
                &fail,
            )?;
        }
        Ok(rules)
    }

    pub fn domains(&self) -> impl Iterator<Item = &str> {
        self.domains.keys().map(String::as_str)
    }

    /// Whether any rules file defines `domain` (with or without descriptors).
    pub fn has_domain(&self, domain: &str) -> bool {
        self.domains.contains_key(domain)
    }

    /// The rule for one request descriptor in `domain`, if any.
    pub fn find(&self, domain: &str, entries: &[(&str, &str)]) -> Option<Matched> {
        let mut level = self.domains.get(domain)?;
        let mut counter_key = String::with_capacity(64);
        push_part(&mut counter_key, domain);
        let mut node = None;
        for (key, value) in entries {
            let (next, counted_value) =
                if let Some(n) = level.exact.get(*key).and_then(|values| values.get(*value)) {
                    (n, *value)
                } else if let Some((_, pattern, n)) = level
                    .wildcard
                    .iter()
                    .find(|(k, p, _)| k == key && p.matches(value))
                {
                    (
                        n,
                        if n.share_threshold {
                            pattern.text.as_str()
                        } else {
                            *value
                        },
                    )
                } else {
                    (level.any.get(*key)?, *value)
                };
            push_part(&mut counter_key, key);
            push_part(&mut counter_key, counted_value);
            level = &next.children;
            node = Some(next);
        }
        let rule = node?.rule.clone()?;
        Some(Matched { rule, counter_key })
    }
}

/// How deep under the rules directory files are looked for.
const MAX_RULES_DEPTH: usize = 16;

/// The rules files `path` names, sorted: the file itself, or every `.yaml`/`.yml` file under the
/// directory, skipping hidden entries (the `..data` links of a Kubernetes ConfigMap mount). Links
/// are followed, but each directory is walked once (by its real path), at most
/// [`MAX_RULES_DEPTH`] deep, so a link that loops back ends the walk there.
pub(crate) fn rule_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    fn walk(
        dir: &Path,
        depth: usize,
        seen: &mut std::collections::HashSet<PathBuf>,
        out: &mut Vec<PathBuf>,
    ) -> std::io::Result<()> {
        if depth > MAX_RULES_DEPTH || !seen.insert(std::fs::canonicalize(dir)?) {
            return Ok(());
        }
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                continue;
            }
            let p = entry.path();
            if p.is_dir() {
                walk(&p, depth + 1, seen, out)?;
            } else if name.ends_with(".yaml") || name.ends_with(".yml") {
                out.push(p);
            }
        }
        Ok(())
    }
    if !path.is_dir() {
        // Reading a missing file fails here, with the path in the error.
        std::fs::metadata(path)?;
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    walk(path, 0, &mut Default::default(), &mut out)?;
    out.sort();
    Ok(out)
}

/// Compiles `docs` into `level`. `merged_from`: this level is a merged domain's top level, which
/// already holds the descriptors of these (domain, files); a duplicate names them.
fn compile_level(
    level: &mut Level,
    docs: &[DescriptorDoc],
    path: &str,
    id: &str,
    merged_from: Option<(&str, &str)>,
    fail: &dyn Fn(String, String) -> RulesError,
) -> Result<(), RulesError> {
    for (i, d) in docs.iter().enumerate() {
        let here = format!("{path}[{i}]");
        if d.key.is_empty() {
            return Err(fail(format!("{here}.key"), "must not be empty".into()));
        }
        // An empty value is no value, as in envoyproxy/ratelimit.
        let value = d.value.as_deref().filter(|v| !v.is_empty());
        let node_id = match value {
            Some(v) => format!("{id}.{}_{v}", d.key),
            None => format!("{id}.{}", d.key),
        };
        let rule = d
            .rate_limit
            .as_ref()
            .map(|r| {
                compile_rule(
                    r,
                    d.shadow_mode,
                    &node_id,
                    &format!("{here}.rate_limit"),
                    fail,
                )
            })
            .transpose()?;
        let is_wildcard = value.is_some_and(|v| v.contains('*'));
        if d.share_threshold && !is_wildcard {
            return Err(fail(
                format!("{here}.share_threshold"),
                "only applies to a value with a * wildcard".into(),
            ));
        }
        let mut children = Level::default();
        compile_level(
            &mut children,
            &d.descriptors,
            &format!("{here}.descriptors"),
            &node_id,
            None,
            fail,
        )?;
        let node = Node {
            rule,
            share_threshold: d.share_threshold,
            children,
        };
        // detailed_metric and value_to_metric shape metric names only; accepted for
        // compatibility.
        let _ = (d.detailed_metric, d.value_to_metric);
        let duplicate = match value {
            None => level.any.insert(d.key.clone(), node).is_some(),
            Some(v) if is_wildcard => {
                let dup = level
                    .wildcard
                    .iter()
                    .any(|(k, p, _)| *k == d.key && p.text == v);
                level.wildcard.push((d.key.clone(), Pattern::new(v), node));
                dup
            }
            Some(v) => level
                .exact
                .entry(d.key.clone())
                .or_default()
                .insert(v.to_string(), node)
                .is_some(),
        };
        if duplicate {
            let what = format!(
                "duplicate descriptor: key {:?}{}",
                d.key,
                value.map(|v| format!(" value {v:?}")).unwrap_or_default()
            );
            return Err(fail(
                here,
                match merged_from {
                    Some((domain, files)) => format!(
                        "{what} is already defined for domain {domain:?} (merged from {files})"
                    ),
                    None => format!("{what} appears twice at this level"),
                },
            ));
        }
    }
    Ok(())
}

fn compile_rule(
    r: &RateLimitDoc,
    shadow_mode: bool,
    id: &str,
    path: &str,
    fail: &dyn Fn(String, String) -> RulesError,
) -> Result<Arc<Rule>, RulesError> {
    let limit = match (r.unlimited, r.unit, r.requests_per_unit) {
        // envoyproxy/ratelimit ignores requests_per_unit on an unlimited rule, but not a unit.
        (true, None, _) => RuleLimit::Unlimited,
        (true, Some(_), _) => {
            return Err(fail(
                format!("{path}.unit"),
                "should not be set when unlimited is true".into(),
            ));
        }
        (false, Some(unit), Some(requests_per_unit)) => RuleLimit::PerUnit {
            requests_per_unit,
            unit,
        },
        (false, None, _) => return Err(fail(format!("{path}.unit"), "is required".into())),
        (false, _, None) => {
            return Err(fail(
                format!("{path}.requests_per_unit"),
                "is required".into(),
            ));
        }
    };
    if r.name.as_deref() == Some("") {
        return Err(fail(format!("{path}.name"), "must not be empty".into()));
    }
    let mut replaces = Vec::with_capacity(r.replaces.len());
    for (i, rep) in r.replaces.iter().enumerate() {
        let here = format!("{path}.replaces[{i}].name");
        match rep.name.as_deref() {
            None | Some("") => return Err(fail(here, "must not be empty".into())),
            Some(name) if r.name.as_deref() == Some(name) => {
                return Err(fail(
                    here,
                    format!("{name:?} is this rule's own name: a rule cannot replace itself"),
                ));
            }
            Some(name) => replaces.push(name.to_string()),
        }
    }
    Ok(Arc::new(Rule {
        limit,
        name: r.name.clone(),
        replaces,
        shadow_mode,
        algorithm: r.algorithm,
        id: id.to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(yaml: &str) -> Rules {
        Rules::from_texts([(Path::new("test.yaml"), yaml)], false).unwrap()
    }

    fn err(yaml: &str) -> RulesError {
        Rules::from_texts([(Path::new("bad.yaml"), yaml)], false).unwrap_err()
    }

    fn limit_of(r: &Rules, domain: &str, entries: &[(&str, &str)]) -> Option<RuleLimit> {
        r.find(domain, entries).map(|m| m.rule.limit)
    }

    fn per(requests_per_unit: u64, unit: Unit) -> Option<RuleLimit> {
        Some(RuleLimit::PerUnit {
            requests_per_unit,
            unit,
        })
    }

    #[test]
    fn wildcard_patterns() {
        let p = Pattern::new("/api/*/resource/*/action");
        assert!(p.matches("/api/v1/resource/123/action"));
        assert!(!p.matches("/api/v1/resource/123/other"));
        assert!(Pattern::new("value*").matches("value"));
        assert!(Pattern::new("value*").matches("valueXYZ"));
        assert!(!Pattern::new("value*").matches("valu"));
        assert!(Pattern::new("*").matches(""));
        assert!(Pattern::new("a*a").matches("aa"));
        assert!(!Pattern::new("a*a").matches("a"));
        assert!(Pattern::new("*x*").matches("..x.."));
    }

    #[test]
    fn value_beats_key_and_depth_must_equal_entries() {
        let r = rules(
            "domain: edge
descriptors:
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 10}
  - key: remote_address
    value: 50.0.0.5
    rate_limit: {unit: SECOND, requests_per_unit: 0}
  - key: key
    value: value
    rate_limit: {unit: second, requests_per_unit: 300}
",
        );
        assert_eq!(
            limit_of(&r, "edge", &[("remote_address", "50.0.0.1")]),
            per(10, Unit::Second)
        );
        assert_eq!(
            limit_of(&r, "edge", &[("remote_address", "50.0.0.5")]),
            per(0, Unit::Second)
        );
        assert_eq!(
            limit_of(&r, "edge", &[("key", "value"), ("subkey", "x")]),
            None
        );
        assert_eq!(limit_of(&r, "edge", &[]), None);
        assert_eq!(limit_of(&r, "other", &[("remote_address", "1")]), None);
    }

    #[test]
    fn nested_descriptors_and_placeholders() {
        let r = rules(
            "domain: messaging
descriptors:
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit: {unit: day, requests_per_unit: 5}
  - key: to_number
    rate_limit: {unit: day, requests_per_unit: 100}
",
        );
        let marketing = [("message_type", "marketing"), ("to_number", "2061111111")];
        assert_eq!(limit_of(&r, "messaging", &marketing), per(5, Unit::Day));
        // The placeholder alone has no limit.
        assert_eq!(limit_of(&r, "messaging", &marketing[..1]), None);
        assert_eq!(
            limit_of(&r, "messaging", &[("to_number", "1")]),
            per(100, Unit::Day)
        );
        // Each number gets its own counter.
        let a = r.find("messaging", &[("to_number", "1")]).unwrap();
        let b = r.find("messaging", &[("to_number", "2")]).unwrap();
        assert_ne!(a.counter_key, b.counter_key);
    }

    #[test]
    fn wildcards_match_in_order_and_share_threshold_shares_a_counter() {
        let r = rules(
            "domain: files
descriptors:
  - key: files
    value: files/*
    share_threshold: true
    rate_limit: {unit: hour, requests_per_unit: 10}
  - key: own
    value: own/*
    rate_limit: {unit: hour, requests_per_unit: 10}
  - key: own
    value: own/special
    rate_limit: {unit: hour, requests_per_unit: 99}
  - key: own
    rate_limit: {unit: hour, requests_per_unit: 1}
",
        );
        let a = r.find("files", &[("files", "files/a.pdf")]).unwrap();
        let b = r.find("files", &[("files", "files/b.csv")]).unwrap();
        assert_eq!(a.counter_key, b.counter_key);
        let a = r.find("files", &[("own", "own/a")]).unwrap();
        let b = r.find("files", &[("own", "own/b")]).unwrap();
        assert_ne!(a.counter_key, b.counter_key);
        assert_eq!(a.rule.limit, per(10, Unit::Hour).unwrap());
        assert_eq!(
            limit_of(&r, "files", &[("own", "own/special")]),
            per(99, Unit::Hour)
        );
        assert_eq!(
            limit_of(&r, "files", &[("own", "elsewhere")]),
            per(1, Unit::Hour)
        );
    }

    #[test]
    fn unlimited_replaces_shadow_and_names() {
        let r = rules(
            "domain: x
descriptors:
  - key: ldap
    rate_limit: {unlimited: true}
  - key: user
    shadow_mode: true
    rate_limit:
      name: specific
      replaces: [{name: general}]
      algorithm: token_bucket
      unit: minute
      requests_per_unit: 5
",
        );
        assert_eq!(
            limit_of(&r, "x", &[("ldap", "a")]),
            Some(RuleLimit::Unlimited)
        );
        let m = r.find("x", &[("user", "bob")]).unwrap();
        assert!(m.rule.shadow_mode);
        assert_eq!(m.rule.name.as_deref(), Some("specific"));
        assert_eq!(m.rule.replaces, vec!["general".to_string()]);
        assert_eq!(m.rule.id, "x.user");
        assert_eq!(m.rule.algorithm, Some(Algorithm::TokenBucket));
        assert_eq!(r.find("x", &[("ldap", "a")]).unwrap().rule.algorithm, None);
    }

    #[test]
    fn counter_keys_cannot_collide_through_separators() {
        let r = rules(
            "domain: d\ndescriptors:\n  - key: a\n    descriptors:\n      - key: b\n        rate_limit: {unit: second, requests_per_unit: 1}\n  - key: a\n    value: x\n    rate_limit: {unit: second, requests_per_unit: 1}\n",
        );
        let one = r.find("d", &[("a", "1:b"), ("b", "2")]).unwrap();
        let two = r.find("d", &[("a", "1"), ("b", "b2")]).unwrap();
        assert_ne!(one.counter_key, two.counter_key);
    }

    #[test]
    fn mistakes_are_named_with_file_and_path() {
        let e = err(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n",
        );
        assert_eq!(e.path, "descriptors[0].rate_limit.unit");
        assert!(e.message.contains("fortnight"), "{e}");
        assert!(e.to_string().contains("bad.yaml"), "{e}");
        let e = err(
            "domain: d\ndescriptors:\n  - key: a\n    descriptors:\n      - key: b\n        rate_limit: {unit: second}\n",
        );
        assert_eq!(
            e.path,
            "descriptors[0].descriptors[0].rate_limit.requests_per_unit"
        );
        let e = err(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unlimited: true, unit: second}\n",
        );
        assert_eq!(e.path, "descriptors[0].rate_limit.unit");
        let e = err("domain: d\ndescriptors:\n  - key: a\n    ratelimit: {unit: second}\n");
        assert_eq!(e.path, "descriptors[0].ratelimit");
        assert!(e.message.contains("unknown field"), "{e}");
        let e =
            err("domain: d\ndescriptors:\n  - key: a\n    value: v\n  - key: a\n    value: v\n");
        assert_eq!(e.path, "descriptors[1]");
        assert!(e.message.contains("duplicate"), "{e}");
        let e =
            err("domain: d\ndescriptors:\n  - key: a\n    value: v\n    share_threshold: true\n");
        assert_eq!(e.path, "descriptors[0].share_threshold");
        let e = err(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: -1}\n",
        );
        assert_eq!(e.path, "descriptors[0].rate_limit.requests_per_unit");
        let e = err("domain: 'unterminated\n");
        assert!(e.to_string().contains("line 1 column 9"), "{e}");
        let e = err("descriptors: []\n");
        assert!(e.message.contains("domain"), "{e}");
    }

    #[test]
    fn a_domain_lives_in_one_file() {
        let e = Rules::from_texts(
            [
                (Path::new("a.yaml"), "domain: d\n"),
                (Path::new("b.yaml"), "domain: d\n"),
            ],
            false,
        )
        .unwrap_err();
        assert_eq!(e.file, Path::new("b.yaml"));
        assert!(e.message.contains("a.yaml"), "{e}");
    }

    #[test]
    fn a_rule_cannot_replace_itself_and_replaces_need_names() {
        let e = err(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      name: me\n      replaces: [{name: other}, {name: me}]\n      unit: second\n      requests_per_unit: 1\n",
        );
        assert_eq!(e.path, "descriptors[0].rate_limit.replaces[1].name");
        assert!(e.message.contains("itself"), "{e}");
        for empty in ["{name: ''}", "{name: }", "{}"] {
            let e = err(&format!(
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {{replaces: [{empty}], unit: second, requests_per_unit: 1}}\n"
            ));
            assert_eq!(
                e.path, "descriptors[0].rate_limit.replaces[0].name",
                "{empty}"
            );
            assert!(e.message.contains("empty"), "{e}");
        }
    }

    #[test]
    fn metadata_is_accepted_as_a_mapping() {
        let r = rules(
            "domain: d\ndescriptors:\n  - key: a\n    metadata: {name: svc, nested: {list: [1, x]}}\n    rate_limit: {unit: second, requests_per_unit: 3}\n",
        );
        assert_eq!(limit_of(&r, "d", &[("a", "1")]), per(3, Unit::Second));
        let e = err("domain: d\ndescriptors:\n  - key: a\n    metadata: just text\n");
        assert_eq!(e.path, "descriptors[0].metadata");
    }

    #[test]
    fn unlimited_ignores_requests_per_unit_and_an_empty_value_is_no_value() {
        let r = rules(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unlimited: true, requests_per_unit: 5}\n  - key: b\n    value: ''\n    rate_limit: {unit: second, requests_per_unit: 2}\n",
        );
        assert_eq!(limit_of(&r, "d", &[("a", "x")]), Some(RuleLimit::Unlimited));
        assert_eq!(limit_of(&r, "d", &[("b", "x")]), per(2, Unit::Second));
        assert_eq!(r.find("d", &[("b", "x")]).unwrap().rule.id, "d.b");
    }

    #[test]
    fn merged_domains_join_top_level_descriptors_and_refuse_duplicates() {
        let one = "domain: d\ndescriptors:\n  - key: a\n    value: '1'\n    rate_limit: {unit: minute, requests_per_unit: 10}\n  - key: w\n    value: x*\n    rate_limit: {unit: minute, requests_per_unit: 1}\n";
        let two = "domain: d\ndescriptors:\n  - key: b\n    value: '2'\n    rate_limit: {unit: minute, requests_per_unit: 20}\n  - key: w\n    value: xy*\n    rate_limit: {unit: minute, requests_per_unit: 2}\n";
        let r = Rules::from_texts(
            [(Path::new("1.yaml"), one), (Path::new("2.yaml"), two)],
            true,
        )
        .unwrap();
        assert_eq!(limit_of(&r, "d", &[("a", "1")]), per(10, Unit::Minute));
        assert_eq!(limit_of(&r, "d", &[("b", "2")]), per(20, Unit::Minute));
        // Wildcards keep file order across files: the first file's pattern is tried first.
        assert_eq!(limit_of(&r, "d", &[("w", "xyz")]), per(1, Unit::Minute));
        let e = Rules::from_texts(
            [(Path::new("1.yaml"), one), (Path::new("2.yaml"), one)],
            true,
        )
        .unwrap_err();
        assert_eq!(
            (e.file.as_path(), e.path.as_str()),
            (Path::new("2.yaml"), "descriptors[0]")
        );
        assert!(
            e.message.contains("1.yaml") && e.message.contains("duplicate"),
            "{e}"
        );
        // Without merging, the second file is refused and told about the setting.
        let e = Rules::from_texts(
            [(Path::new("1.yaml"), one), (Path::new("2.yaml"), two)],
            false,
        )
        .unwrap_err();
        assert_eq!(
            (e.file.as_path(), e.path.as_str()),
            (Path::new("2.yaml"), "domain")
        );
        assert!(e.message.contains("merge_domains"), "{e}");
    }

    #[test]
    fn load_reads_a_directory_and_skips_hidden_entries() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("one.yaml"), "domain: one\n").unwrap();
        std::fs::create_dir(dir.path().join("nested")).unwrap();
        std::fs::write(dir.path().join("nested/two.yml"), "domain: two\n").unwrap();
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        std::fs::write(dir.path().join("..data/one.yaml"), "domain: one\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not yaml").unwrap();
        let r = Rules::load(dir.path(), false).unwrap();
        let mut domains: Vec<_> = r.domains().collect();
        domains.sort();
        assert_eq!(domains, ["one", "two"]);
        let e = Rules::load(&dir.path().join("missing.yaml"), false).unwrap_err();
        assert!(e.message.contains("cannot read"), "{e}");
    }

    /// Directory links that loop back (`a -> .`, `b -> ..`) are walked once: loading finds each
    /// file once, and soon, instead of following the loop until paths are too long (and, with two
    /// such links, through exponentially many paths).
    #[test]
    fn links_that_loop_are_walked_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        std::fs::write(dir.path().join("rules/one.yaml"), "domain: one\n").unwrap();
        std::os::unix::fs::symlink(".", dir.path().join("rules/a")).unwrap();
        std::os::unix::fs::symlink("..", dir.path().join("rules/b")).unwrap();
        let path = dir.path().join("rules");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(Rules::load(&path, false)).ok());
        let loaded = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("loading ends")
            .unwrap();
        assert_eq!(loaded.domains().collect::<Vec<_>>(), ["one"]);
    }
}
