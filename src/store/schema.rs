//! Each route checked against the live schema, and the statements it writes with.
//!
//! Every identifier in these statements comes from the configuration and is quoted, so a
//! name with capitals, spaces or quotes is taken literally and cannot inject SQL.

use sqlx::PgPool;

use super::{StoreError, db, quote_ident};
use crate::config::{ColumnType, Envelope, OnTruncate, WriteMethod, WriteMode};
use crate::decode::CopyFormat;
use crate::route::{Route, Source};

/// The statements one route writes with.
#[derive(Debug, Clone)]
pub(super) struct RouteSql {
    /// `COPY .. FROM STDIN` of the decoded lines: into the table (insert), or into the
    /// staging table (upsert).
    pub copy: String,
    /// For COPY BINARY: the column types it relies on, checked before each COPY. Rows
    /// are COPY text without.
    pub types: Option<ColumnTypes>,
    /// The relations this route COPYs into, as Postgres names them in the context of an
    /// error (`COPY <relation>, line N`).
    pub copy_relations: Vec<String>,
    /// `INSERT` of one row from text parameters, for `sink.write_method: row_inserts`.
    pub insert: Option<String>,
    /// Names of the unique index on the source coordinates, and of its partitions' on a
    /// partitioned table (Postgres names the partition's): a violation of it means the
    /// protocol broke, so it stops the worker instead of becoming a dead letter.
    pub source_index: Vec<String>,
    /// That index, schema-qualified: partitions created after start (pg_partman's
    /// premade ones) have index partitions `source_index` does not name.
    pub source_root: Option<String>,
    /// Replays of an insert route: deleting and keeping rows by coordinates.
    pub replay: Option<ReplaySql>,
    /// Staging and applying an upsert route's rows.
    pub upsert: Option<UpsertSql>,
}

impl RouteSql {
    /// The format the route's rows are decoded into and COPYed in.
    pub fn format(&self) -> CopyFormat {
        match self.types {
            Some(_) => CopyFormat::Binary,
            None => CopyFormat::Text,
        }
    }
}

/// The types of a table's columns as the worker found them at start. COPY BINARY
/// carries no types: were a column's type changed meanwhile (`ALTER TABLE .. TYPE`),
/// the server would read the decoder's bytes as another type, an error or, between
/// types of one size (float8 and int8), wrong values.
#[derive(Debug, Clone)]
pub(super) struct ColumnTypes {
    /// Locks the table against such changes until the transaction ends, as the COPY
    /// would, but before the check.
    pub lock: String,
    pub table: String,
    pub names: Vec<String>,
    pub oids: Vec<i64>,
}

/// Counts the columns of table `$3` that still have their names `$1` and type OIDs `$2`.
pub(super) const COLUMN_TYPES_CHECK: &str = "SELECT count(*) FROM pg_attribute a \
     JOIN unnest($1::text[], $2::int8[]) AS e(name, oid) \
       ON a.attname::text = e.name AND a.atttypid::int8 = e.oid \
     WHERE a.attrelid = to_regclass($3) AND a.attnum > 0 AND NOT a.attisdropped";

/// Finds the lines of an upsert route (re-driven dead letters) whose key's row holds a
/// higher `version`, or was written from a later offset of the same partition.
#[derive(Debug, Clone)]
pub(super) struct SupersededSql {
    /// Takes `$1` line numbers and, per entry of `fields`, the text of that field of
    /// each line; returns the superseded line numbers, each with what makes its key's
    /// row newer (its version, or the offset that wrote it).
    pub select: String,
    /// Indexes (in the route's columns) of the fields bound after `$1`.
    pub fields: Vec<usize>,
}

/// Statements of replays after a rewind.
#[derive(Debug, Clone)]
pub(super) struct ReplaySql {
    /// Deletes the target rows of ranges `($1 topics, $2 partitions, $3 from, $4 until)`.
    pub delete_replaced: String,
    /// A session-local table of the mapped columns, emptied at commit.
    pub create_staging: String,
    pub copy_staging: String,
    /// Moves staged rows into the target table, except re-read rows of the ranges
    /// `$1..$4` that are already there.
    pub insert_kept: String,
    pub clear_staging: String,
}

/// Statements of an upsert: the batch's lines are COPYed into a session-local staging
/// table, then the last line of each key deletes or writes its row.
#[derive(Debug, Clone)]
pub(super) struct UpsertSql {
    /// `COPY` of the mapped columns straight into the table, for a batch that only
    /// writes new keys (see `commit::insert_new_keys`); none where a COPY would not do
    /// what the INSERT does.
    pub copy_direct: Option<String>,
    /// When the next batches try `copy_direct`; shared by the route's lanes.
    pub direct: std::sync::Arc<super::commit::DirectTries>,
    /// How a line that writes its key with nothing more to do ends (its flags).
    pub plain_end: &'static [u8],
    pub create_staging: String,
    /// Deletes tombstoned keys, upserts the rest, empties the staging table.
    pub apply: String,
    /// Present when the route records its rows' source position.
    pub superseded: Option<SupersededSql>,
}

/// Staging columns after the mapped ones: a Debezium route's columns left unread
/// (`,2,5,`) and truncate flag, the delete flag, then the line's position.
const UNCHANGED: &str = "\"kafka_pg_ingest.unchanged\"";
const TRUNCATE_FLAG: &str = "\"kafka_pg_ingest.truncate\"";
const DELETE_FLAG: &str = "\"kafka_pg_ingest.delete\"";
const SEQUENCE: &str = "\"kafka_pg_ingest.seq\"";

/// The flags a staged line ends with (see `Decoder::decode_into`).
fn flag_columns(route: &Route) -> String {
    if route.envelope == Envelope::Debezium {
        format!("{UNCHANGED}, {TRUNCATE_FLAG}, {DELETE_FLAG}")
    } else {
        DELETE_FLAG.to_owned()
    }
}

/// One column of a live table.
#[derive(Debug, sqlx::FromRow)]
struct LiveColumn {
    name: String,
    /// As `format_type` shows it, e.g. `character varying(20)`.
    shown: String,
    /// `pg_type.typname` of the (base) type, e.g. `varchar`.
    base: String,
    /// `pg_attribute.atttypid`.
    type_oid: i64,
    not_null: bool,
    /// A default, identity or generated column.
    filled: bool,
    generated: bool,
}

/// Checks every route against the live schema and prepares its statements; a mismatch
/// is a fatal error listing every problem, each naming the route, column, expected and
/// actual type.
pub(super) async fn prepare(
    pool: &PgPool,
    routes: impl Iterator<Item = &Route>,
    method: WriteMethod,
) -> Result<Vec<RouteSql>, StoreError> {
    let mut prepared = Vec::new();
    let mut problems = Vec::new();
    for (index, route) in routes.enumerate() {
        let inspected = inspect(pool, route, method, &mut problems).await?;
        prepared.push(statements(route, index, inspected, method));
    }
    if problems.is_empty() {
        Ok(prepared)
    } else {
        Err(StoreError::Fatal(format!(
            "the configuration does not match the database:\n  {}",
            problems.join("\n  ")
        )))
    }
}

/// What the live schema says about one route beyond whether it fits.
#[derive(Default)]
struct Inspected {
    /// The names of the unique index on the source coordinates of an insert route
    /// (with its partitions'), and the index schema-qualified.
    source_index: Vec<String>,
    source_root: Option<String>,
    /// The column types COPY BINARY relies on, when the route can write it.
    types: Option<ColumnTypes>,
    /// An upsert route's batches of new keys may COPY straight into the table.
    direct: bool,
    /// The columns of an upsert route's unique index: its key, plus on a partitioned
    /// table the partition key columns the index must also hold.
    conflict: Vec<String>,
}

/// Checks one route, adding what does not fit to `problems`.
async fn inspect(
    pool: &PgPool,
    route: &Route,
    method: WriteMethod,
    problems: &mut Vec<String>,
) -> Result<Inspected, StoreError> {
    let label = format!(
        "{} ({} -> {})",
        route.key,
        route.topics_label(),
        route.table
    );
    let table = quoted_table(route);
    let live: Vec<LiveColumn> = sqlx::query_as(
        "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS shown, \
           COALESCE(b.typname, t.typname)::text AS base, a.atttypid::int8 AS type_oid, \
           a.attnotnull AS not_null, \
           (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '') AS filled, \
           a.attgenerated <> '' AS generated \
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
         LEFT JOIN pg_type b ON t.typtype = 'd' AND b.oid = t.typbasetype \
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum",
    )
    .bind(&table)
    .fetch_all(pool)
    .await
    .map_err(db("read the target table's columns"))?;
    if live.is_empty() {
        problems.push(format!(
            "{label}: table {table} does not exist: create it (`kafka-pg-ingest schema` prints a fitting CREATE TABLE)"
        ));
        return Ok(Inspected::default());
    }
    let live_column = |name: &str| live.iter().find(|l| l.name == name);
    let binary = lockable(pool, &table).await?
        && binary_fits(route, method, |name| {
            live_column(name).map(|l| l.base.as_str())
        });
    let types = binary.then(|| ColumnTypes {
        // ONLY: a partitioned table's own lock already conflicts with a type change,
        // which needs the parent's strongest lock; its partitions stay as COPY
        // leaves them.
        lock: format!("LOCK TABLE ONLY {table} IN ROW EXCLUSIVE MODE"),
        table: table.clone(),
        names: route.columns.iter().map(|c| c.name.clone()).collect(),
        oids: route
            .columns
            .iter()
            .filter_map(|c| live_column(&c.name).map(|l| l.type_oid))
            .collect(),
    });
    for column in &route.columns {
        let Some(found) = live.iter().find(|l| l.name == column.name) else {
            problems.push(format!(
                "{label}: column {} does not exist in {table} (expected type {})",
                quote_ident(&column.name),
                column.kind.sql_name()
            ));
            continue;
        };
        let accepted = column.kind.accepted_columns();
        if !accepted.contains(&found.base.as_str()) {
            problems.push(format!(
                "{label}: column {} is {} in the table, but `type: {}` writes {}: change the type or the column",
                quote_ident(&column.name),
                found.shown,
                column.kind.sql_name(),
                accepted.join(" or ")
            ));
        }
        if found.generated {
            problems.push(format!(
                "{label}: column {} is generated and cannot be written: remove its mapping",
                quote_ident(&column.name)
            ));
        }
    }
    for required in live.iter().filter(|l| l.not_null && !l.filled) {
        if !route.columns.iter().any(|c| c.name == required.name) {
            problems.push(format!(
                "{label}: column {} ({}) is NOT NULL without a default, and no mapping fills it: map it or give it a default",
                quote_ident(&required.name),
                required.shown
            ));
        }
    }
    let partitioning = Partitioning::read(pool, &table, route).await?;
    let mut source_index = Vec::new();
    let mut source_root = None;
    let mut direct = false;
    let mut conflict = Vec::new();
    match route.mode {
        WriteMode::Insert => {
            if let Some(coordinates) = route.coordinates() {
                let found = unique_index(pool, &table, &coordinates, false, &partitioning).await?;
                if let Some(index) = &found {
                    let root = format!(
                        "{}.{}",
                        quote_ident(&route.schema_name),
                        quote_ident(&index.name)
                    );
                    source_index = index_tree(pool, &root).await?;
                    // A plain index is no partition tree.
                    source_index.push(index.name.clone());
                    source_root = Some(root);
                } else {
                    problems.push(format!(
                        "{label}: {table} needs a unique index on ({}) (the @topic, @partition and \
                         @offset columns{}): exactly-once audits and replays rely on it",
                        partitioning.wanted(&coordinates),
                        partitioning.plus(),
                    ));
                }
            }
        }
        WriteMode::Upsert => {
            let key: Vec<&str> = route.key_columns.iter().map(String::as_str).collect();
            match unique_index(pool, &table, &key, true, &partitioning).await? {
                Some(index) => {
                    if route.delete_on_tombstone && index.columns.len() > key.len() {
                        problems.push(format!(
                            "{label}: {table} is partitioned by a column outside the upsert key, \
                             which a tombstone does not carry: set delete_on_tombstone: false, or \
                             partition by a key column"
                        ));
                    }
                    if route.envelope == Envelope::Debezium && index.columns.len() > key.len() {
                        // A delete carries only the key, and an update may move the row
                        // to another partition: both need the row found by key alone.
                        problems.push(format!(
                            "{label}: {table} is partitioned by a column outside the upsert key: \
                             a Debezium delete carries only the key, and an update that changes \
                             the partition column would leave the old row behind. Partition by a \
                             key column (or mirror into an unpartitioned table)"
                        ));
                    }
                    conflict = index.columns;
                }
                None => problems.push(format!(
                    "{label}: {table} needs a unique index or primary key on exactly ({}) for mode: upsert \
                     (valid and not deferrable: INSERT .. ON CONFLICT decides by it{})",
                    partitioning.wanted(&key),
                    partitioning.plus(),
                )),
            }
            direct = plain_inserts_fit(pool, &table).await?;
        }
    }
    Ok(Inspected {
        source_index,
        source_root,
        types,
        direct,
        conflict,
    })
}

/// The partition key columns of a table and of its partitions, at every level.
struct Partitioning {
    keys: Vec<String>,
    /// Those the route maps from the record.
    mapped: Vec<String>,
}

impl Partitioning {
    async fn read(pool: &PgPool, table: &str, route: &Route) -> Result<Self, StoreError> {
        let keys: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT a.attname::text FROM pg_partition_tree(to_regclass($1)) t \
             JOIN pg_partitioned_table p ON p.partrelid = t.relid \
             JOIN pg_attribute a ON a.attrelid = p.partrelid \
               AND a.attnum = ANY(p.partattrs::int2[]) \
             ORDER BY 1",
        )
        .bind(table)
        .fetch_all(pool)
        .await
        .map_err(db("read the target table's partition keys"))?;
        let mapped = keys
            .iter()
            .filter(|k| route.columns.iter().any(|c| &c.name == *k))
            .cloned()
            .collect();
        Ok(Self { keys, mapped })
    }


    /// `columns`, then the mapped partition key columns outside them, quoted.
    fn wanted(&self, columns: &[&str]) -> String {
        let extra = self
            .mapped
            .iter()
            .map(String::as_str)
            .filter(|k| !columns.contains(k));
        quoted_list(columns.iter().copied().chain(extra))
    }

    /// Why a partitioned table's index holds more columns, for messages; and which
    /// partition key columns the route must map first. One it leaves to the table could
    /// be filled differently for a record read again (a default of `now()`), so no
    /// index holding it is taken.
    fn plus(&self) -> String {
        if self.keys.is_empty() {
            return String::new();
        }
        let mut plus = format!(
            ", plus the partition key columns ({}), as Postgres requires of a unique index on \
             a partitioned table",
            quoted_list(self.keys.iter().map(String::as_str))
        );
        let unmapped: Vec<&str> = self
            .keys
            .iter()
            .filter(|k| !self.mapped.contains(k))
            .map(String::as_str)
            .collect();
        if !unmapped.is_empty() {
            plus.push_str(&format!(
                "; map {} from the record (a value field or @timestamp), so a record read \
                 again lands on the same index entry",
                quoted_list(unmapped.into_iter())
            ));
        }
        plus
    }
}

/// Whether a COPY into `table` does what `INSERT` does with the same new rows: no
/// row-level security (COPY FROM refuses it), no rules (COPY skips them), and no BEFORE
/// INSERT row trigger (it may change or drop a row, which the upsert would do to the
/// last line of each key only), on the table or any of its partitions.
async fn plain_inserts_fit(pool: &PgPool, table: &str) -> Result<bool, StoreError> {
    const ROW_BEFORE_INSERT: i32 = 1 | 2 | 4;
    sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM pg_class c \
           WHERE (c.oid = to_regclass($1) \
                  OR c.oid IN (SELECT relid FROM pg_partition_tree(to_regclass($1)))) \
             AND (c.relrowsecurity OR c.relhasrules OR EXISTS (SELECT 1 FROM pg_trigger t \
             WHERE t.tgrelid = c.oid AND NOT t.tgisinternal AND t.tgenabled <> 'D' \
               AND t.tgtype::int4 & $2 = $2)))",
    )
    .bind(table)
    .bind(ROW_BEFORE_INSERT)
    .fetch_one(pool)
    .await
    .map_err(db(
        "look up the target table's rules, policies and triggers",
    ))
}

/// Whether this role may lock `table` against type changes as COPY BINARY needs: a
/// table or partitioned table (not a view or foreign table) on which it holds a
/// table-wide privilege that allows `ROW EXCLUSIVE` (an INSERT granted on columns only
/// does not). Otherwise the route writes COPY text.
async fn lockable(pool: &PgPool, table: &str) -> Result<bool, StoreError> {
    sqlx::query_scalar(
        "SELECT c.relkind IN ('r', 'p') \
           AND has_table_privilege(c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE') \
         FROM pg_class c WHERE c.oid = to_regclass($1)",
    )
    .bind(table)
    .fetch_optional(pool)
    .await
    .map(|found| found.unwrap_or(false))
    .map_err(db("check the target table's privileges"))
}

/// Whether the route can write COPY BINARY: the server would read every column's binary
/// form as the decoder writes it: an insert route written by COPY whose columns' (base) types are exactly
/// their mapping's types (text may also go into varchar or char). Anything else (a
/// wider column, json for jsonb, numeric, whose binary form the decoder does not
/// write) is COPY text, which Postgres converts. Upsert routes stay text: re-drives read
/// their staged lines back as text.
fn binary_fits<'a>(
    route: &Route,
    method: WriteMethod,
    base_of: impl Fn(&str) -> Option<&'a str>,
) -> bool {
    let fits = |kind: ColumnType, base: &str| match kind {
        ColumnType::Numeric => false,
        ColumnType::Text => matches!(base, "text" | "varchar" | "bpchar"),
        _ => kind.accepted_columns().first() == Some(&base),
    };
    route.mode == WriteMode::Insert
        && method == WriteMethod::Copy
        && route
            .columns
            .iter()
            .all(|c| base_of(&c.name).is_some_and(|base| fits(c.kind, base)))
}

/// The names of the index partitions under the schema-qualified index `root`, with its
/// own when it is partitioned; none for a plain index.
async fn index_tree(pool: &PgPool, root: &str) -> Result<Vec<String>, StoreError> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_partition_tree(to_regclass($1)) t \
         JOIN pg_class c ON c.oid = t.relid",
    )
    .bind(root)
    .fetch_all(pool)
    .await
    .map_err(db("look up the partitions of an index"))
}

/// A unique index that decides a route's rows.
#[derive(Debug, sqlx::FromRow)]
struct UniqueIndex {
    name: String,
    /// In index order.
    columns: Vec<String>,
}

/// A valid unique, non-partial index of `table` on exactly `columns`, or, on a
/// partitioned table, on `columns` plus partition key columns the route maps (Postgres
/// requires those in every unique index there; mapped, a record read again maps to the
/// same entry); with `immediate`, one checked at each row (not deferrable), as
/// `ON CONFLICT` needs. The index with the fewest columns wins.
async fn unique_index(
    pool: &PgPool,
    table: &str,
    columns: &[&str],
    immediate: bool,
    partitioning: &Partitioning,
) -> Result<Option<UniqueIndex>, StoreError> {
    let found: Vec<UniqueIndex> = sqlx::query_as(
        "SELECT i.relname::text AS name, \
           array(SELECT a.attname::text FROM unnest(x.indkey::int2[]) WITH ORDINALITY k(n, o) \
                 JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.n \
                 WHERE k.o <= x.indnkeyatts ORDER BY k.o) AS columns \
         FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid \
         WHERE x.indrelid = to_regclass($1) AND x.indisunique AND x.indpred IS NULL \
           AND x.indexprs IS NULL AND x.indisvalid AND x.indisready \
           AND (x.indimmediate OR NOT $2) \
         ORDER BY x.indnatts, i.relname",
    )
    .bind(table)
    .bind(immediate)
    .fetch_all(pool)
    .await
    .map_err(db("look up unique indexes"))?;
    Ok(found.into_iter().find(|index| {
        columns
            .iter()
            .all(|c| index.columns.iter().any(|i| i == c))
            && index
                .columns
                .iter()
                .all(|i| columns.contains(&i.as_str()) || partitioning.mapped.contains(i))
    }))
}

/// `"schema"."table"`.
pub(super) fn quoted_table(route: &Route) -> String {
    format!(
        "{}.{}",
        quote_ident(&route.schema_name),
        quote_ident(&route.table_name)
    )
}

fn quoted_list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.map(quote_ident).collect::<Vec<_>>().join(", ")
}

fn statements(route: &Route, index: usize, inspected: Inspected, method: WriteMethod) -> RouteSql {
    let Inspected {
        source_index,
        source_root,
        types,
        direct,
        conflict,
    } = inspected;
    let table = quoted_table(route);

    let columns = quoted_list(route.columns.iter().map(|c| c.name.as_str()));
    let options = if types.is_some() {
        " (FORMAT binary)"
    } else {
        ""
    };
    match route.mode {
        WriteMode::Insert => RouteSql {
            copy: format!("COPY {table} ({columns}) FROM STDIN{options}"),
            types,
            copy_relations: vec![
                route.table_name.clone(),
                format!("kafka_pg_ingest_replay_{index}"),
            ],
            insert: (method == WriteMethod::RowInserts).then(|| {
                let values = route
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("${}::{}", i + 1, c.kind.sql_name()))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("INSERT INTO {table} ({columns}) VALUES ({values})")
            }),
            source_index,
            source_root,
            replay: route
                .coordinates()
                .map(|c| ReplaySql::new(&table, &columns, c, index, options)),
            upsert: None,
        },
        WriteMode::Upsert => {
            let staging = format!("pg_temp.kafka_pg_ingest_upsert_{index}");
            RouteSql {
                copy: format!(
                    "COPY {staging} ({columns}, {}) FROM STDIN{options}",
                    flag_columns(route)
                ),
                types,
                copy_relations: vec![format!("kafka_pg_ingest_upsert_{index}")],
                insert: None,
                source_index: Vec::new(),
                source_root: None,
                replay: None,
                upsert: Some(UpsertSql::new(
                    route, &table, &columns, &staging, direct, &conflict,
                )),
            }
        }
    }
}

impl ReplaySql {
    fn new(
        table: &str,
        column_list: &str,
        [topic, partition, offset]: [&str; 3],
        index: usize,
        copy_options: &str,
    ) -> Self {
        let (t, p, o) = (
            quote_ident(topic),
            quote_ident(partition),
            quote_ident(offset),
        );
        let ranges = "unnest($1::text[], $2::int4[], $3::int8[], $4::int8[]) AS k(t, p, f, u)";
        // One per route: a session keeps its temporary tables, each shaped like its route.
        let staging = format!("pg_temp.kafka_pg_ingest_replay_{index}");
        Self {
            delete_replaced: format!(
                "DELETE FROM {table} x USING {ranges} \
                 WHERE x.{t} = k.t AND x.{p} = k.p AND x.{o} >= k.f AND x.{o} < k.u"
            ),
            create_staging: format!(
                "CREATE TEMP TABLE IF NOT EXISTS {staging} ON COMMIT DELETE ROWS AS \
                 SELECT {column_list} FROM {table} WITH NO DATA"
            ),
            copy_staging: format!("COPY {staging} ({column_list}) FROM STDIN{copy_options}"),
            insert_kept: format!(
                "INSERT INTO {table} ({column_list}) SELECT {column_list} FROM {staging} s \
                 WHERE NOT EXISTS (SELECT 1 FROM {ranges} JOIN {table} x \
                   ON x.{t} = k.t AND x.{p} = k.p AND x.{o} >= k.f AND x.{o} < k.u \
                   WHERE x.{t} = s.{t} AND x.{p} = s.{p} AND x.{o} = s.{o})"
            ),
            clear_staging: format!("DELETE FROM {staging}"),
        }
    }
}

/// The condition under which a staged line `s` may change the existing row `t` of its
/// key: unless the row came from a later offset of the same partition (and topic, when
/// mapped). A replay, a re-drive or a producer out of order then never puts an older
/// version over a newer one; across partitions Kafka gives no order, and the line wins.
///
/// With `version:` set, the line may unless the row holds a higher version (a row
/// without a version takes any line; a line without one changes no row that has one).
fn not_older(route: &Route, s: &str) -> Option<String> {
    if let Some(version) = &route.version {
        let v = quote_ident(version);
        return Some(format!("coalesce({s}.{v} >= t.{v}, t.{v} IS NULL)"));
    }
    let v = route.source_version()?;
    let same = |column: &str| {
        let c = quote_ident(column);
        format!("t.{c} IS NOT DISTINCT FROM {s}.{c}")
    };
    let mut same_source = vec![same(v.partition)];
    same_source.extend(v.topic.map(same));
    let offset = quote_ident(v.offset);
    Some(format!(
        "NOT ({} AND coalesce(t.{offset} > {s}.{offset}, false))",
        same_source.join(" AND ")
    ))
}

impl UpsertSql {
    /// `conflict`: the columns of the unique index that decides a row (the key, plus
    /// partition key columns on a partitioned table).
    fn new(
        route: &Route,
        table: &str,
        columns: &str,
        staging: &str,
        direct: bool,
        conflict: &[String],
    ) -> Self {
        let key = quoted_list(conflict.iter().map(String::as_str));
        // The last line of each key decides it (of its highest version, with `version:`);
        // the sequence numbers lines in COPY order.
        let newest = route.version.as_deref().map_or_else(String::new, |v| {
            format!("{} DESC NULLS LAST, ", quote_ident(v))
        });
        let last = format!(
            "(SELECT DISTINCT ON ({key}) * FROM {staging} ORDER BY {key}, {newest}{SEQUENCE} DESC) s"
        );
        let updates: Vec<String> = route
            .columns
            .iter()
            .filter(|c| !conflict.contains(&c.name))
            .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(&c.name)))
            .collect();
        let action = match (updates.is_empty(), not_older(route, "EXCLUDED")) {
            (true, _) => "DO NOTHING".to_owned(),
            (false, None) => format!("DO UPDATE SET {}", updates.join(", ")),
            (false, Some(newer)) => {
                format!("DO UPDATE SET {} WHERE {newer}", updates.join(", "))
            }
        };
        let envelope = route.envelope == Envelope::Debezium;
        let mut apply = String::new();
        if let (OnTruncate::Truncate, Some(version)) = (route.on_truncate, &route.version) {
            // A truncate deletes the rows of versions below its own, and drops the
            // batch's lines before it: later ones (from other partitions too) stay, and a
            // replay of it deletes nothing written after it. A version it shares (a
            // transaction's `ts_ms`) orders by Kafka order within the batch, and keeps the
            // rows of earlier batches: losing none beats deleting all.
            let v = quote_ident(version);
            let upto = format!("(SELECT max({v}) FROM {staging} WHERE {TRUNCATE_FLAG})");
            apply.push_str(&format!(
                "DELETE FROM {table} t WHERE EXISTS (SELECT FROM {staging} WHERE {TRUNCATE_FLAG}) \
                   AND coalesce(t.{v} < {upto}, true); \
                 DELETE FROM {staging} s WHERE {TRUNCATE_FLAG} OR EXISTS (SELECT FROM {staging} x \
                   WHERE x.{TRUNCATE_FLAG} AND (s.{v} < x.{v} OR s.{v} = x.{v} AND s.{SEQUENCE} < x.{SEQUENCE})); "
            ));
        }
        if envelope {
            apply.push_str(&keep_unread(route, table, staging, conflict));
        }
        if route.delete_on_tombstone || envelope {
            let matches = same_key(&route.key_columns, "t", "s");
            let newer = not_older(route, "s").map_or_else(String::new, |c| format!(" AND {c}"));
            apply.push_str(&format!(
                "DELETE FROM {table} t USING {last} WHERE s.{DELETE_FLAG} AND {matches}{newer}; "
            ));
        }
        apply.push_str(&format!(
            "INSERT INTO {table} AS t ({columns}) SELECT {columns} FROM {last} \
             WHERE NOT s.{DELETE_FLAG} ON CONFLICT ({key}) {action}; DELETE FROM {staging}"
        ));
        let (flags, lookup) = if envelope {
            // Unread values are looked up by key among the batch's earlier lines.
            let name = staging.trim_start_matches("pg_temp.");
            (
                format!("NULL::text AS {UNCHANGED}, false AS {TRUNCATE_FLAG}, "),
                format!(
                    "; CREATE INDEX IF NOT EXISTS {name}_key ON {staging} ({key}, {SEQUENCE})"
                ),
            )
        } else {
            (String::new(), String::new())
        };
        Self {
            copy_direct: direct.then(|| format!("COPY {table} ({columns}) FROM STDIN")),
            direct: std::sync::Arc::default(),
            plain_end: if envelope { b"\t\\N\tf\tf\n" } else { b"\tf\n" },
            create_staging: format!(
                "CREATE TEMP TABLE IF NOT EXISTS {staging} ON COMMIT DELETE ROWS AS \
                 SELECT {columns}, {flags}false AS {DELETE_FLAG} FROM {table} WITH NO DATA; \
                 ALTER TABLE {staging} ADD COLUMN IF NOT EXISTS {SEQUENCE} \
                 int8 GENERATED ALWAYS AS IDENTITY{lookup}"
            ),
            apply,
            superseded: SupersededSql::new(route, table, conflict),
        }
    }
}

/// The condition that rows `a` and `b` have the same values in `key`.
fn same_key(key: &[String], a: &str, b: &str) -> String {
    key.iter()
        .map(|k| format!("{a}.{0} = {b}.{0}", quote_ident(k)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Fills in the columns a Debezium event left unread (an unchanged TOASTed value) in
/// each staged line: from the latest earlier line of its key in the batch that has the
/// column, else from the row in the table (NULL without one). The later upsert then
/// writes what the row held, never the placeholder.
fn keep_unread(route: &Route, table: &str, staging: &str, conflict: &[String]) -> String {
    let (earlier, in_table) = (same_key(conflict, "p", "s"), same_key(conflict, "t", "s"));
    let sets: Vec<String> = route
        .columns
        .iter()
        .enumerate()
        .filter(|(_, c)| !conflict.contains(&c.name))
        .map(|(i, c)| {
            let c = quote_ident(&c.name);
            let has = format!(
                "{staging} p WHERE {earlier} AND p.{SEQUENCE} < s.{SEQUENCE} \
                 AND NOT p.{DELETE_FLAG} AND position(',{i},' IN coalesce(p.{UNCHANGED}, '')) = 0"
            );
            format!(
                "{c} = CASE WHEN position(',{i},' IN s.{UNCHANGED}) = 0 THEN s.{c} \
                 WHEN EXISTS (SELECT FROM {has}) \
                 THEN (SELECT p.{c} FROM {has} ORDER BY p.{SEQUENCE} DESC LIMIT 1) \
                 ELSE (SELECT t.{c} FROM {table} t WHERE {in_table}) END"
            )
        })
        .collect();
    if sets.is_empty() {
        return String::new();
    }
    format!(
        "UPDATE {staging} s SET {} WHERE s.{UNCHANGED} IS NOT NULL; ",
        sets.join(", ")
    )
}

impl SupersededSql {
    fn new(route: &Route, table: &str, conflict: &[String]) -> Option<Self> {
        // What orders a key's versions: the `version` column, else the offset within one
        // partition (and topic).
        let (order, same): (&str, Vec<&str>) = match (&route.version, route.source_version()) {
            (Some(version), _) => (version, Vec::new()),
            (None, Some(source)) => (
                source.offset,
                std::iter::once(source.partition).chain(source.topic).collect(),
            ),
            (None, None) => return None,
        };
        let index = |name: &str| route.columns.iter().position(|c| c.name == name);
        let mut names: Vec<&str> = conflict.iter().map(String::as_str).collect();
        let keys = names.len();
        names.push(order);
        names.extend(&same);
        let fields: Vec<usize> = names.iter().filter_map(|n| index(n)).collect();
        // Each field arrives as its COPY text and is cast to the mapped type.
        let value = |i: usize| {
            let column = &route.columns[fields[i]];
            format!("u.f{i}::{}", column.kind.sql_name())
        };
        let arrays: Vec<String> = (0..fields.len())
            .map(|i| format!("${}::text[]", i + 2))
            .collect();
        let aliases: Vec<String> = (0..fields.len()).map(|i| format!("f{i}")).collect();
        let mut matches: Vec<String> = (0..keys)
            .map(|i| format!("t.{} = {}", quote_ident(names[i]), value(i)))
            .collect();
        for (j, name) in same.iter().enumerate() {
            matches.push(format!("t.{} = {}", quote_ident(name), value(keys + 1 + j)));
        }
        let order = quote_ident(order);
        // A row of the same version counts as newer: a version may be shared by changes
        // (a transaction's `ts_ms`), and a re-drive must not undo a later one.
        let (newer, found) = if route.version.is_some() {
            (">=", format!("'version ' || t.{order}::text"))
        } else {
            (
                ">",
                format!("'written from offset ' || t.{order}::text || ' of the same partition'"),
            )
        };
        matches.push(format!("t.{order} {newer} {}", value(keys)));
        Some(Self {
            select: format!(
                "SELECT u.line, {found} FROM unnest($1::int4[], {arrays}) AS u(line, {aliases}) \
                 JOIN {table} t ON {matches}",
                arrays = arrays.join(", "),
                aliases = aliases.join(", "),
                matches = matches.join(" AND "),
            ),
            fields,
        })
    }
}

/// How `schema` partitions the tables it prints.
#[derive(Debug, Clone)]
pub struct PartitionBy {
    /// A mapped `timestamptz` or `date` column of every route.
    pub column: String,
    pub interval: PartitionInterval,
    /// Print pg_partman's `create_parent` call instead of the first partitions.
    pub partman: bool,
}

/// The time range of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PartitionInterval {
    Hour,
    Day,
    Week,
    Month,
}

impl PartitionInterval {
    /// The interval's name in pg_partman 4's `create_parent`.
    fn partman(self) -> &'static str {
        match self {
            Self::Hour => "hourly",
            Self::Day => "daily",
            Self::Week => "weekly",
            Self::Month => "monthly",
        }
    }

    /// The start of the interval holding `at`, and of the next one (weeks start on
    /// Monday, as pg_partman's do).
    fn bounds(self, at: chrono::NaiveDateTime) -> (chrono::NaiveDateTime, chrono::NaiveDateTime) {
        use chrono::{Datelike, Duration, Months, Timelike};
        let day = at.date().and_hms_opt(0, 0, 0).unwrap_or(at);
        match self {
            Self::Hour => {
                let start = day + Duration::hours(i64::from(at.hour()));
                (start, start + Duration::hours(1))
            }
            Self::Day => (day, day + Duration::days(1)),
            Self::Week => {
                let start = day - Duration::days(i64::from(at.weekday().num_days_from_monday()));
                (start, start + Duration::weeks(1))
            }
            Self::Month => {
                let start = day - Duration::days(i64::from(at.day0()));
                (start, start + Months::new(1))
            }
        }
    }
}

/// `CREATE TABLE` statements that fit the routes' mappings, partitioned by time when
/// asked (`now` places the first partitions). A route that does not map the column as
/// `timestamptz` or `date` is refused, naming it.
pub fn create_statements<'a>(
    routes: impl Iterator<Item = &'a Route>,
    partition_by: Option<&PartitionBy>,
    now: chrono::NaiveDateTime,
) -> Result<String, String> {
    let mut out = String::new();
    for route in routes {
        let table = quoted_table(route);
        let partition_column = match partition_by {
            None => None,
            Some(by) => match route.columns.iter().find(|c| c.name == by.column) {
                Some(c) if matches!(c.kind, ColumnType::Timestamptz | ColumnType::Date) => {
                    Some((by, c))
                }
                found => {
                    return Err(format!(
                        "--partition-by {}: route {} ({}) {}: give a column it maps as \
                         timestamptz or date",
                        by.column,
                        route.key,
                        route.table,
                        found.map_or("does not map it".to_owned(), |c| format!(
                            "maps it as {}",
                            c.kind.sql_name()
                        ))
                    ));
                }
            },
        };
        // Postgres requires the partition key in every unique index.
        let with_partition = |columns: Vec<&str>| {
            let mut columns = columns;
            if let Some((by, _)) = partition_column
                && !columns.contains(&by.column.as_str())
            {
                columns.push(&by.column);
            }
            quoted_list(columns.into_iter())
        };
        let mut lines: Vec<String> = route
            .columns
            .iter()
            .map(|c| {
                let always = matches!(c.source, Source::Topic | Source::Partition | Source::Offset);
                let not_null = if c.required || always || route.is_key(&c.name) {
                    " NOT NULL"
                } else {
                    ""
                };
                format!(
                    "    {} {}{not_null}",
                    quote_ident(&c.name),
                    c.kind.sql_name()
                )
            })
            .collect();
        match (route.mode, route.coordinates()) {
            (WriteMode::Upsert, _) => lines.push(format!(
                "    PRIMARY KEY ({})",
                with_partition(route.key_columns.iter().map(String::as_str).collect())
            )),
            (WriteMode::Insert, Some(coordinates)) => lines.push(format!(
                "    UNIQUE ({})",
                with_partition(coordinates.to_vec())
            )),
            (WriteMode::Insert, None) => {}
        }
        let partitioned = partition_column.map_or(String::new(), |(_, c)| {
            format!(" PARTITION BY RANGE ({})", quote_ident(&c.name))
        });
        out.push_str(&format!(
            "-- {}: {} -> {}\nCREATE SCHEMA IF NOT EXISTS {};\nCREATE TABLE IF NOT EXISTS {table} (\n{}\n){partitioned};\n",
            route.key,
            route.topics_label(),
            route.table,
            quote_ident(&route.schema_name),
            lines.join(",\n")
        ));
        if let Some((by, column)) = partition_column {
            out.push_str(&partitions(route, by, column.kind, now));
        }
        out.push('\n');
    }
    Ok(out)
}

/// The partitions of a table `create_statements` partitions: pg_partman's
/// `create_parent`, or the current and the next interval's, to be made ahead from then
/// on.
fn partitions(route: &Route, by: &PartitionBy, kind: ColumnType, now: chrono::NaiveDateTime) -> String {
    let table = quoted_table(route);
    if by.partman {
        // pg_partman 4 takes the parent as `schema.table` text and quotes nothing.
        return format!(
            "CREATE SCHEMA IF NOT EXISTS partman;\n\
             CREATE EXTENSION IF NOT EXISTS pg_partman SCHEMA partman;\n\
             SELECT partman.create_parent('{}.{}', '{}', 'native', '{}', p_premake := 4);\n\
             -- Then run partman.run_maintenance() regularly (its background worker or cron), \
             and set a retention in partman.part_config to drop old partitions.\n",
            route.schema_name.replace('\'', "''"),
            route.table_name.replace('\'', "''"),
            by.column.replace('\'', "''"),
            by.interval.partman(),
        );
    }
    let (start, next) = by.interval.bounds(now);
    let (_, after) = by.interval.bounds(next);
    let bound = |at: chrono::NaiveDateTime| match kind {
        ColumnType::Date => at.format("'%Y-%m-%d'").to_string(),
        _ => at.format("'%Y-%m-%d %H:%M:%S+00'").to_string(),
    };
    let mut out = String::from(
        "-- Partitions of the current and the next interval; make each next one ahead of \
         time (or use --partman): a row no partition takes is a db_rejected dead letter.\n",
    );
    for (from, to) in [(start, next), (next, after)] {
        let name = format!("{}_p{}", route.table_name, from.format("%Y%m%d%H"));
        out.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS {}.{} PARTITION OF {table} FOR VALUES FROM ({}) TO ({});\n",
            quote_ident(&route.schema_name),
            quote_ident(&name),
            bound(from),
            bound(to)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::PartitionInterval;

    #[test]
    fn partition_intervals_start_at_the_hour_day_monday_and_first_of_the_month() {
        let at = |s: &str| {
            chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").expect("a time")
        };
        // 2026-12-03 is a Thursday.
        let now = at("2026-12-03 14:35:09");
        let cases = [
            (PartitionInterval::Hour, "2026-12-03 14:00:00", "2026-12-03 15:00:00"),
            (PartitionInterval::Day, "2026-12-03 00:00:00", "2026-12-04 00:00:00"),
            (PartitionInterval::Week, "2026-11-30 00:00:00", "2026-12-07 00:00:00"),
            (PartitionInterval::Month, "2026-12-01 00:00:00", "2027-01-01 00:00:00"),
        ];
        for (interval, start, next) in cases {
            assert_eq!(interval.bounds(now), (at(start), at(next)), "{interval:?}");
        }
    }
}
