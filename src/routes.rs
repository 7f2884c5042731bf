//! All routes of a configuration, resolved and checked, each with its decoder.
//!
//! A configuration has either `routes:` or, when that is empty, one implicit route: the
//! mapping of `sink` for every topic of `kafka.topics`, its source coordinates appended
//! as `@topic`, `@partition` and `@offset` columns. Resolving checks every route against
//! the mapping rules (a column default must encode as its column's type, so this room
//! sits above `decode`; `route` holds the shapes both use).

use std::sync::Arc;

use regex::Regex;

use crate::config::{
    ColumnMapping, ColumnType, Config, ConfigError, Envelope, OnTruncate, RouteConfig,
    SinkConfig, ValueFormat, WriteMode, invalid,
};
use crate::decode::Decoder;
use crate::decode::framed::SchemaCache;
use crate::route::{Column, Route, Source, TimeFormat, Topics};

impl Route {
    fn build(
        key: String,
        topics: Topics,
        config: &RouteConfig,
        column_keys: &[String],
    ) -> Result<Self, ConfigError> {
        let table = &config.table;
        let Some((schema_name, table_name)) = table
            .split_once('.')
            .filter(|(s, t)| !s.is_empty() && !t.is_empty())
        else {
            return Err(invalid(
                &format!("{key}.table"),
                format!("`{table}` must be schema-qualified, e.g. web_metrics.metrics"),
            ));
        };
        if config.columns.is_empty() {
            return Err(invalid(
                &format!("{key}.columns"),
                "must map at least one column",
            ));
        }
        let mut columns: Vec<Column> = Vec::with_capacity(config.columns.len());
        for (mapping, at) in config.columns.iter().zip(column_keys) {
            if mapping.column.is_empty() || columns.iter().any(|c| c.name == mapping.column) {
                return Err(invalid(
                    at,
                    format!("column `{}` is empty or named twice", mapping.column),
                ));
            }
            columns.push(column(mapping, at)?);
        }
        let route = Self {
            schema_name: schema_name.to_owned(),
            table_name: table_name.to_owned(),
            table: table.clone(),
            mode: config.mode,
            key_columns: config.key.clone(),
            delete_on_tombstone: config.delete_on_tombstone,
            format: config.format,
            key_format: config.key_format,
            envelope: config.envelope,
            on_truncate: config.on_truncate,
            version: config.version.clone(),
            columns,
            topics,
            key,
        };
        route.check_mode()?;
        route.check_envelope()?;
        route.check_version()?;
        Ok(route)
    }

    fn check_envelope(&self) -> Result<(), ConfigError> {
        let key = &self.key;
        if self.envelope == Envelope::None {
            if self.on_truncate != OnTruncate::Ignore {
                return Err(invalid(
                    &format!("{key}.on_truncate"),
                    "applies to Debezium events only: set envelope: debezium",
                ));
            }
            if let Some(column) = self
                .columns
                .iter()
                .find(|c| matches!(c.source, Source::Op | Source::EventMeta(_)))
            {
                return Err(invalid(
                    &format!("{key}.columns"),
                    format!(
                        "column `{}` reads `{}`, which only a Debezium event has: set envelope: debezium",
                        column.name, column.field
                    ),
                ));
            }
            return Ok(());
        }
        if self.mode != WriteMode::Upsert {
            return Err(invalid(
                &format!("{key}.envelope"),
                "debezium needs mode: upsert with the table's key in `key` (a change event \
                 writes or deletes the row of its key)",
            ));
        }
        if self.delete_on_tombstone {
            return Err(invalid(
                &format!("{key}.delete_on_tombstone"),
                "does not apply with envelope: debezium: a delete event (op d) deletes its key, \
                 and the tombstone after it is skipped",
            ));
        }
        if self.format == ValueFormat::Protobuf {
            // proto3 leaves zero values out of a message, which a row image cannot tell
            // from NULL, and Connect's decimals become messages of their own.
            return Err(invalid(
                &format!("{key}.envelope"),
                "debezium reads JSON, JSON Schema or Avro events, not format: protobuf",
            ));
        }
        if self.on_truncate == OnTruncate::Truncate {
            // A truncate comes without a key, on any partition: Kafka orders it against
            // nothing else, so only the version says which rows it removes.
            if self.version.is_none() {
                return Err(invalid(
                    &format!("{key}.on_truncate"),
                    "truncate needs `version:` (e.g. a column from @source:/lsn): a truncate \
                     event deletes the rows older than itself, which only the version tells \
                     across partitions and replays",
                ));
            }
            if !matches!(&self.topics, Topics::Named(names) if names.len() == 1) {
                return Err(invalid(
                    &format!("{key}.on_truncate"),
                    "truncate needs a route reading one topic: one table's truncate event must \
                     not empty rows another topic wrote",
                ));
            }
        }
        Ok(())
    }

    fn check_version(&self) -> Result<(), ConfigError> {
        let key = &self.key;
        let Some(name) = &self.version else {
            return Ok(());
        };
        let at = format!("{key}.version");
        if self.mode != WriteMode::Upsert {
            return Err(invalid(&at, "orders the versions of a key: it needs mode: upsert"));
        }
        let Some(column) = self.columns.iter().find(|c| &c.name == name) else {
            return Err(invalid(&at, format!("names `{name}`, which is not a mapped column")));
        };
        if self.is_key(name) {
            return Err(invalid(
                &at,
                format!("names `{name}`, a key column: the version must be another column"),
            ));
        }
        if self.delete_on_tombstone && column.source.reads_value() {
            return Err(invalid(
                &at,
                format!(
                    "names `{name}`, which reads the value ({}), but a tombstone that deletes has \
                     none: map it from @key_json:/pointer or @header:name",
                    column.field
                ),
            ));
        }
        if self.envelope == Envelope::Debezium
            && matches!(column.source, Source::Field(_) | Source::Pointer(_) | Source::Value)
        {
            return Err(invalid(
                &at,
                format!(
                    "names `{name}`, which reads the row image ({}), but a delete's `before` holds \
                     only the key (REPLICA IDENTITY DEFAULT): take the version from the event, \
                     e.g. field: \"@source:/lsn\"",
                    column.field
                ),
            ));
        }
        if !matches!(
            column.kind,
            ColumnType::Int2
                | ColumnType::Int4
                | ColumnType::Int8
                | ColumnType::Numeric
                | ColumnType::Timestamptz
                | ColumnType::Date
        ) {
            return Err(invalid(
                &at,
                format!(
                    "names `{name}` of type {}: a version must compare as a number or a time \
                     (int2, int4, int8, numeric, timestamptz or date)",
                    column.kind.sql_name()
                ),
            ));
        }
        Ok(())
    }

    fn check_mode(&self) -> Result<(), ConfigError> {
        let key = &self.key;
        match self.mode {
            WriteMode::Insert => {
                if !self.key_columns.is_empty() || self.delete_on_tombstone {
                    return Err(invalid(
                        &format!("{key}.mode"),
                        "is insert, but `key` and `delete_on_tombstone` need mode: upsert",
                    ));
                }
                if self.coordinates().is_none() {
                    return Err(invalid(
                        &format!("{key}.columns"),
                        "need one column each from @topic, @partition and @offset in mode insert \
                         (under a unique index): they make a duplicate impossible and let replays \
                         find their rows",
                    ));
                }
            }
            WriteMode::Upsert => {
                if self.key_columns.is_empty() {
                    return Err(invalid(
                        &format!("{key}.key"),
                        "must name the columns of the table's unique key for mode: upsert",
                    ));
                }
                for name in &self.key_columns {
                    let Some(column) = self.columns.iter().find(|c| &c.name == name) else {
                        return Err(invalid(
                            &format!("{key}.key"),
                            format!("names `{name}`, which is not a mapped column"),
                        ));
                    };
                    if self.delete_on_tombstone && column.source.reads_value() {
                        return Err(invalid(
                            &format!("{key}.delete_on_tombstone"),
                            format!(
                                "needs every key column from record metadata, but `{name}` reads \
                                 the value ({}), which a tombstone has not: map it from @key, \
                                 @key_json:/pointer or @header:name",
                                column.field
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn column(mapping: &ColumnMapping, at: &str) -> Result<Column, ConfigError> {
    let source = Source::parse(&mapping.field).map_err(|p| invalid(&format!("{at}.field"), p))?;
    let temporal = matches!(mapping.kind, ColumnType::Timestamptz | ColumnType::Date);
    let format = match mapping.format.as_deref() {
        None if source == Source::Timestamp => TimeFormat::EpochMs,
        None | Some("iso8601") => TimeFormat::Iso8601,
        Some(_) if !temporal => {
            return Err(invalid(
                &format!("{at}.format"),
                "applies to timestamptz and date columns only",
            ));
        }
        Some(epoch @ ("epoch_s" | "epoch_ms" | "epoch_us")) => {
            if mapping.kind != ColumnType::Timestamptz {
                return Err(invalid(
                    &format!("{at}.format"),
                    format!("`{epoch}` applies to timestamptz columns only"),
                ));
            }
            match epoch {
                "epoch_s" => TimeFormat::EpochS,
                "epoch_ms" => TimeFormat::EpochMs,
                _ => TimeFormat::EpochUs,
            }
        }
        Some(pattern) => {
            let parsed = chrono::format::StrftimeItems::new(pattern).parse();
            if parsed.is_err() || !pattern.contains('%') {
                return Err(invalid(
                    &format!("{at}.format"),
                    format!(
                        "`{pattern}` is neither iso8601, epoch_s, epoch_ms, epoch_us nor a strftime pattern such as %d/%m/%Y"
                    ),
                ));
            }
            TimeFormat::Pattern(pattern.to_owned())
        }
    };
    let column = Column {
        name: mapping.column.clone(),
        field: mapping.field.clone(),
        source,
        kind: mapping.kind,
        required: mapping.required,
        default: mapping.default.clone().filter(|d| !d.is_null()),
        coerce: mapping.coerce,
        format,
    };
    if let Some(default) = &column.default
        && let Err(rejection) = crate::decode::encode_value(
            &column,
            default,
            crate::decode::CopyFormat::Text,
            &mut Vec::new(),
        )
    {
        return Err(invalid(
            &format!("{at}.default"),
            format!("does not fit the column: {}", rejection.reason),
        ));
    }
    Ok(column)
}

/// Every route of a configuration, each with its decoder.
#[derive(Debug, Clone)]
pub struct Routes {
    decoders: Vec<Decoder>,
    schemas: Arc<SchemaCache>,
}

impl Routes {
    /// Resolves and validates the routes, naming the key to change on error.
    pub fn new(config: &Config) -> Result<Self, ConfigError> {
        let routes = if config.routes.is_empty() {
            vec![implicit(config)?]
        } else {
            explicit(config)?
        };
        check_limits(&config.sink, &routes)?;
        let schemas = Arc::new(SchemaCache::default());
        let decoders = routes
            .into_iter()
            .map(|route| Decoder::new(&config.sink, route, &schemas))
            .collect();
        Ok(Self { decoders, schemas })
    }

    /// The writer schemas the routes reading a registry format decode with.
    pub fn schemas(&self) -> &Arc<SchemaCache> {
        &self.schemas
    }

    /// Whether a route reads a registry format.
    pub fn read_registry(&self) -> bool {
        self.iter()
            .any(|r| r.format.framed() || r.key_format.framed().is_some())
    }

    /// The index of the route for `topic`: a route naming it, else the first whose regex
    /// matches.
    pub fn route_of(&self, topic: &str) -> Option<usize> {
        let named = |d: &Decoder| matches!(d.route().topics, Topics::Named(_));
        let position = |want_named: bool| {
            self.decoders
                .iter()
                .position(|d| named(d) == want_named && d.route().matches(topic))
        };
        position(true).or_else(|| position(false))
    }

    pub fn decoders(&self) -> &[Decoder] {
        &self.decoders
    }

    /// Has route `index` decode its rows in `format` (what its table takes).
    pub(crate) fn set_format(&mut self, index: usize, format: crate::decode::CopyFormat) {
        if let Some(decoder) = self.decoders.get_mut(index) {
            decoder.set_format(format);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.decoders.iter().map(Decoder::route)
    }

    /// The topics and `^regex` patterns to subscribe to.
    pub fn subscription(&self) -> Vec<String> {
        let mut topics = Vec::new();
        for route in self.iter() {
            match &route.topics {
                Topics::Named(names) => topics.extend(names.iter().cloned()),
                // librdkafka takes a subscription starting with `^` as a regex; the group
                // keeps an alternation inside the anchors.
                Topics::Matching(pattern, _) => topics.push(format!("^({pattern})$")),
            }
        }
        topics
    }

    /// The target tables, comma-separated (for spans).
    pub fn tables(&self) -> String {
        let mut tables: Vec<&str> = self.iter().map(|r| r.table.as_str()).collect();
        tables.dedup();
        tables.join(",")
    }
}

/// The mapping of `sink` for `kafka.topics`.
fn implicit(config: &Config) -> Result<Route, ConfigError> {
    let sink = &config.sink;
    let sc = &sink.source_columns;
    let mut route = RouteConfig {
        topic: None,
        topic_regex: None,
        table: sink.table.clone(),
        mode: WriteMode::Insert,
        key: Vec::new(),
        delete_on_tombstone: false,
        format: sink.format,
        key_format: sink.key_format,
        envelope: Envelope::None,
        on_truncate: OnTruncate::Ignore,
        version: None,
        columns: sink.columns.clone(),
    };
    let mut keys: Vec<String> = (0..sink.columns.len())
        .map(|i| format!("sink.columns[{i}]"))
        .collect();
    for (name, field, kind) in [
        (&sc.topic, "@topic", ColumnType::Text),
        (&sc.partition, "@partition", ColumnType::Int4),
        (&sc.offset, "@offset", ColumnType::Int8),
    ] {
        route.columns.push(ColumnMapping {
            column: name.clone(),
            field: field.to_owned(),
            kind,
            required: true,
            default: None,
            coerce: false,
            format: None,
        });
        keys.push("sink.source_columns".to_owned());
    }
    let topics = Topics::Named(config.kafka.topics.clone());
    Route::build("sink".into(), topics, &route, &keys)
}

fn explicit(config: &Config) -> Result<Vec<Route>, ConfigError> {
    let mut routes: Vec<Route> = Vec::with_capacity(config.routes.len());
    for (i, rc) in config.routes.iter().enumerate() {
        let key = format!("routes[{i}]");
        let topics = match (&rc.topic, &rc.topic_regex) {
            (Some(topic), None) if !topic.is_empty() => {
                let named = |r: &&Route| matches!(r.topics, Topics::Named(_)) && r.matches(topic);
                if let Some(other) = routes.iter().find(named) {
                    return Err(invalid(
                        &format!("{key}.topic"),
                        format!("`{topic}` is already routed by {}", other.key),
                    ));
                }
                Topics::Named(vec![topic.clone()])
            }
            (None, Some(pattern)) => {
                let pattern = unanchored(pattern);
                let anchored = format!("^(?:{pattern})$");
                let regex = Regex::new(&anchored).map_err(|e| {
                    invalid(
                        &format!("{key}.topic_regex"),
                        format!("is not a regex: {e}"),
                    )
                })?;
                Topics::Matching(pattern.to_owned(), regex)
            }
            _ => {
                return Err(invalid(
                    &key,
                    "needs exactly one of `topic` (a name) and `topic_regex`",
                ));
            }
        };
        let column_keys: Vec<String> = (0..rc.columns.len())
            .map(|j| format!("{key}.columns[{j}]"))
            .collect();
        routes.push(Route::build(key, topics, rc, &column_keys)?);
    }
    Ok(routes)
}

/// A topic regex without the anchors a user may have written: routes anchor it anyway.
fn unanchored(regex: &str) -> &str {
    let regex = regex.strip_prefix('^').unwrap_or(regex);
    regex.strip_suffix('$').unwrap_or(regex)
}

/// Below these limits, a record carrying every mapped field could never decode.
fn check_limits(sink: &SinkConfig, routes: &[Route]) -> Result<(), ConfigError> {
    for route in routes {
        let paths: Vec<Vec<&str>> = route
            .columns
            .iter()
            .map(|c| c.source.value_keys())
            .collect();
        let longest_key = paths.iter().flatten().map(|k| k.len()).max().unwrap_or(0);
        let shortest_limit = longest_key.max(1);
        if sink.max_string_bytes < shortest_limit {
            return Err(invalid(
                "sink.max_string_bytes",
                format!(
                    "must be at least {shortest_limit} (the longest key {}.columns reads is {longest_key} bytes)",
                    route.key
                ),
            ));
        }
        let top_level: std::collections::HashSet<&str> =
            paths.iter().filter_map(|p| p.first().copied()).collect();
        let shortest_limit = top_level.len().max(1);
        if sink.max_fields < shortest_limit {
            return Err(invalid(
                "sink.max_fields",
                format!(
                    "must be at least {shortest_limit} ({}.columns reads {} top-level keys)",
                    route.key,
                    top_level.len()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    fn load(yaml: &str) -> Result<Config, ConfigError> {
        crate::config::with_yaml_file(yaml, |file| {
            crate::load_config(Some(file), Vec::new(), &Overrides::default())
        })
    }

    const COORDINATES: &str = "      - { column: t, field: \"@topic\", type: text }\n      - { column: p, field: \"@partition\", type: int4 }\n      - { column: o, field: \"@offset\", type: int8 }\n";

    fn route(head: &str, columns: &str) -> String {
        format!("routes:\n  - {head}\n    columns:\n{columns}")
    }

    #[test]
    fn routes_replace_the_topics_and_a_named_topic_wins_over_a_regex() {
        let yaml = format!(
            "routes:\n  - topic_regex: '^orders|audit.*$'\n    table: s.any\n    columns:\n{COORDINATES}  - topic: orders-eu\n    table: s.eu\n    columns:\n{COORDINATES}"
        );
        let config = load(&yaml).expect("loads");
        let routes = Routes::new(&config).expect("valid");
        assert_eq!(
            routes.subscription(),
            vec!["^(orders|audit.*)$".to_owned(), "orders-eu".to_owned()]
        );
        assert_eq!(routes.route_of("orders-eu"), Some(1), "named first");
        assert_eq!(routes.route_of("orders"), Some(0));
        assert_eq!(routes.route_of("audit-x"), Some(0));
        assert_eq!(routes.route_of("orders-us"), None, "the regex is anchored");
        assert_eq!(routes.tables(), "s.any,s.eu");
    }

    #[test]
    fn the_default_configuration_is_one_route_over_kafka_topics() {
        let config = Config::load(None, Vec::new(), &Overrides::default()).expect("loads");
        let routes = Routes::new(&config).expect("valid");
        let route = routes.iter().next().expect("one route");
        assert_eq!(route.key, "sink");
        assert_eq!(
            route.coordinates(),
            Some(["kafka_topic", "kafka_partition", "kafka_offset"])
        );
        assert_eq!(routes.route_of("website-metrics"), Some(0));
        assert_eq!(routes.subscription(), vec!["website-metrics".to_owned()]);
    }

    #[test]
    fn invalid_routes_name_the_key_to_change() {
        let key_col = "      - { column: id, field: \"@key\", type: int8, coerce: true }\n";
        let value_col = "      - { column: id, field: id, type: int8 }\n";
        let extra = |column: &str| format!("{COORDINATES}      - {column}\n");
        let debezium = "topic: a\n    table: s.t\n    mode: upsert\n    key: [id]\n    envelope: debezium";
        let lsn = "      - { column: v, field: \"@source:/lsn\", type: int8 }\n";
        let cases = [
            (
                route("topic: a\n    table: nodot", COORDINATES),
                "routes[0].table",
            ),
            (
                route("topic: a\n    topic_regex: b\n    table: s.t", COORDINATES),
                "needs exactly one of `topic`",
            ),
            (
                route("topic_regex: '('\n    table: s.t", COORDINATES),
                "routes[0].topic_regex",
            ),
            (
                route(
                    "topic: a\n    table: s.t",
                    "      - { column: x, field: \"@nope\", type: text }\n",
                ),
                "routes[0].columns[0].field",
            ),
            (
                route(
                    "topic: a\n    table: s.t",
                    "      - { column: x, field: x, type: text }\n",
                ),
                "@topic, @partition and @offset in mode insert",
            ),
            (
                route("topic: a\n    table: s.t\n    mode: upsert", key_col),
                "routes[0].key",
            ),
            (
                route(
                    "topic: a\n    table: s.t\n    mode: upsert\n    key: [nope]",
                    key_col,
                ),
                "names `nope`, which is not a mapped column",
            ),
            (
                route(
                    "topic: a\n    table: s.t\n    mode: upsert\n    key: [id]\n    delete_on_tombstone: true",
                    value_col,
                ),
                "routes[0].delete_on_tombstone",
            ),
            (
                route("topic: a\n    table: s.t\n    key: [t]", COORDINATES),
                "routes[0].mode",
            ),
            (
                route(
                    "topic: a\n    table: s.t",
                    &extra("{ column: x, field: x, type: text, format: epoch_ms }"),
                ),
                "routes[0].columns[3].format",
            ),
            (
                route(
                    "topic: a\n    table: s.t",
                    &extra("{ column: x, field: x, type: int8, default: abc }"),
                ),
                "routes[0].columns[3].default",
            ),
            (
                route(
                    "topic: a\n    table: s.t",
                    &extra("{ column: t, field: x, type: text }"),
                ),
                "routes[0].columns[3]",
            ),
            (
                format!(
                    "{}  - topic: a\n    table: s.u\n    columns:\n{COORDINATES}",
                    route("topic: a\n    table: s.t", COORDINATES)
                ),
                "`a` is already routed by routes[0]",
            ),
            (
                route("topic: a\n    table: s.t\n    envelope: debezium", &extra("{ column: x, field: x, type: text }")),
                "`routes[0].envelope` debezium needs mode: upsert",
            ),
            (
                route(&format!("{debezium}\n    delete_on_tombstone: true"), value_col),
                "routes[0].delete_on_tombstone",
            ),
            (
                format!(
                    "schema_registry: {{ url: http://127.0.0.1:1 }}\n{}",
                    route(&format!("{debezium}\n    format: protobuf"), value_col)
                ),
                "not format: protobuf",
            ),
            (
                route(&format!("{debezium}\n    on_truncate: truncate"), value_col),
                "`routes[0].on_truncate` truncate needs `version:`",
            ),
            (
                route(
                    "topic_regex: 'a.*'\n    table: s.t\n    mode: upsert\n    key: [id]\n    \
                     envelope: debezium\n    on_truncate: truncate\n    version: v",
                    &format!("{value_col}{lsn}"),
                ),
                "truncate needs a route reading one topic",
            ),
            (
                route("topic: a\n    table: s.t\n    on_truncate: truncate", COORDINATES),
                "routes[0].on_truncate",
            ),
            (
                route("topic: a\n    table: s.t", &extra("{ column: x, field: \"@op\", type: text }")),
                "only a Debezium event has",
            ),
            (
                route(&format!("{debezium}\n    version: nope"), value_col),
                "`routes[0].version` names `nope`",
            ),
            (
                route(&format!("{debezium}\n    version: id"), value_col),
                "a key column",
            ),
            (
                route(
                    &format!("{debezium}\n    version: v"),
                    &format!("{value_col}      - {{ column: v, field: v, type: int8 }}\n"),
                ),
                "reads the row image",
            ),
            (
                route(
                    &format!("{debezium}\n    version: v"),
                    &format!("{value_col}      - {{ column: v, field: \"@source:/sequence\", type: text }}\n"),
                ),
                "a version must compare as a number or a time",
            ),
        ];
        for (yaml, expected) in cases {
            let err = load(&yaml).expect_err(&yaml).to_string();
            assert!(
                err.contains(expected),
                "expected `{expected}` in `{err}` for\n{yaml}"
            );
        }
    }

    #[test]
    fn the_readme_examples_load() {
        for (file, mode, topic) in [
            (
                "examples/routes/orders.yaml",
                WriteMode::Upsert,
                "shop.orders",
            ),
            (
                "examples/routes/events.yaml",
                WriteMode::Insert,
                "events.clicks",
            ),
            (
                "examples/routes/customers.yaml",
                WriteMode::Upsert,
                "dbserver1.inventory.customers",
            ),
        ] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            let config = crate::load_config(Some(&path), Vec::new(), &Overrides::default())
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            let routes = Routes::new(&config).expect("valid");
            let route = routes.iter().next().expect("one route");
            assert_eq!(route.mode, mode, "{file}");
            assert_eq!(routes.route_of(topic), Some(0), "{file}");
        }
    }

    #[test]
    fn string_and_field_limits_too_small_for_the_mapping_name_the_key() {
        let c = crate::load_config(None, Vec::new(), &Overrides::default()).expect("defaults load");
        assert_eq!((c.sink.max_string_bytes, c.sink.max_fields), (65536, 1000));
        // The default mapping reads 8 top-level keys; the longest, request_timestamp, is 17 bytes.
        for (yaml, key) in [
            ("sink:\n  max_string_bytes: 0\n", "sink.max_string_bytes"),
            ("sink:\n  max_string_bytes: 16\n", "sink.max_string_bytes"),
            ("sink:\n  max_fields: 0\n", "sink.max_fields"),
            ("sink:\n  max_fields: 7\n", "sink.max_fields"),
        ] {
            let err = load(yaml).unwrap_err();
            assert!(err.to_string().contains(key), "{yaml}: {err}");
        }
        let c = load("sink:\n  max_string_bytes: 17\n  max_fields: 8\n").expect("loads");
        assert_eq!((c.sink.max_string_bytes, c.sink.max_fields), (17, 8));
        let pointer = "sink:\n  max_string_bytes: 3\n  max_fields: 1\n  columns:\n    - { column: a, field: /probe/url, type: text }\n    - { column: b, field: /probe/ip, type: inet }\n";
        let err = load(pointer).unwrap_err();
        assert!(err.to_string().contains("sink.max_string_bytes"), "{err}");
        let c = load(&pointer.replace("bytes: 3", "bytes: 5"))
            .expect("a pointer's keys are its segments");
        assert_eq!(c.sink.max_fields, 1);
    }
}
