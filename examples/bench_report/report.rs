//! The Markdown report of a bench run: its tables, tollgate's ratios to its ceilings and to the
//! peers, and the targets, all from the loads' results.

use crate::results::{
    Backend, EnvoyPath, H2loadRun, PeerLoad, Request, Results, Shape, Step, TollgateLoad,
};

/// A peer's part in the targets, from its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Limitador's in-memory storage.
    Memory,
    /// Limitador's Redis storage.
    Redis,
    /// Limitador's cached Redis storage.
    Cached,
}

impl Role {
    /// A name holding `memory`, `redis` or `cached`; a cached-Redis peer is not the Redis one.
    fn played_by(self, name: &str) -> bool {
        match self {
            Role::Memory => name.contains("memory"),
            Role::Cached => name.contains("cached"),
            Role::Redis => name.contains("redis") && !name.contains("cached"),
        }
    }
}

/// A tollgate figure to compare with a peer's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Near {
    pub rps: f64,
    /// Measured right before the peer (marked †), not in the gRPC part.
    pub right_before: bool,
}

/// What a target is measured against: a peer measured in this run, else the orientation
/// figure it names.
#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    pub text: String,
    pub goal: f64,
}

/// Microseconds of CPU per request: `ticks` clock ticks (`clk_tck` a second) over `requests`.
pub fn micros_per(ticks: u64, clk_tck: f64, requests: f64) -> f64 {
    ticks as f64 / clk_tck * 1e6 / requests
}

/// tollgate's CPU per decision in a load, in µs.
pub fn cpu_micros(l: &TollgateLoad, clk_tck: f64) -> Option<f64> {
    (l.decisions.decided > 0.0).then(|| micros_per(l.cpu_ticks, clk_tck, l.decisions.decided))
}

/// The first of the highest: one load now and then runs at a fraction of speed.
fn best(values: impl Iterator<Item = f64>) -> Option<f64> {
    values.reduce(f64::max)
}

impl Results {
    /// The last peer playing `role`.
    pub fn peer_of(&self, role: Role) -> Option<&str> {
        self.peers
            .iter()
            .rev()
            .find(|p| role.played_by(&p.name))
            .map(|p| p.name.as_str())
    }

    /// A load of the gRPC part.
    fn grpc(
        &self,
        backend: Backend,
        request: Request,
        shape: Shape,
        batched: bool,
    ) -> Option<&TollgateLoad> {
        self.tollgate.iter().rfind(|l| {
            l.next_to.is_none()
                && !l.tls_part
                && (l.backend, l.request, l.shape, l.batched) == (backend, request, shape, batched)
        })
    }

    /// tollgate's rate in a load of the gRPC part, in exact quota mode unless `batched`.
    pub fn rps(
        &self,
        backend: Backend,
        request: Request,
        shape: Shape,
        batched: bool,
    ) -> Option<f64> {
        self.grpc(backend, request, shape, batched)
            .map(|l| l.run.rps)
    }

    /// The better of tollgate's hot loads right before `peer`'s.
    pub fn right_before(&self, backend: Backend, request: Request, peer: &str) -> Option<f64> {
        best(
            self.tollgate
                .iter()
                .filter(|l| {
                    l.next_to.as_ref().is_some_and(|(p, _)| p == peer)
                        && (l.backend, l.request, l.shape) == (backend, request, Shape::Hot)
                })
                .map(|l| l.run.rps),
        )
    }

    /// tollgate's figure to compare with `peer`: on one hot key the one measured right before
    /// it when there is one, else the gRPC part's.
    pub fn near(
        &self,
        backend: Backend,
        request: Request,
        shape: Shape,
        peer: Option<&str>,
    ) -> Option<Near> {
        let right_before = match (shape, peer) {
            (Shape::Hot, Some(peer)) => self.right_before(backend, request, peer),
            _ => None,
        };
        match right_before {
            Some(rps) => Some(Near {
                rps,
                right_before: true,
            }),
            None => self.rps(backend, request, shape, false).map(|rps| Near {
                rps,
                right_before: false,
            }),
        }
    }

    /// The tollgate load [`Results::near`] takes its figure from.
    pub fn near_load(
        &self,
        backend: Backend,
        request: Request,
        shape: Shape,
        peer: Option<&str>,
    ) -> Option<&TollgateLoad> {
        let right_before = match (shape, peer) {
            (Shape::Hot, Some(peer)) => self
                .tollgate
                .iter()
                .filter(|l| {
                    l.next_to.as_ref().is_some_and(|(p, _)| p == peer)
                        && (l.backend, l.request, l.shape) == (backend, request, Shape::Hot)
                })
                .reduce(|a, b| if b.run.rps > a.run.rps { b } else { a }),
            _ => None,
        };
        right_before.or_else(|| self.grpc(backend, request, shape, false))
    }

    /// A peer's better load of a shape.
    pub fn peer_best(&self, peer: &str, shape: Shape) -> Option<&PeerLoad> {
        let mut found: Option<&PeerLoad> = None;
        for load in self
            .peer_loads
            .iter()
            .filter(|l| l.peer == peer && l.shape == shape)
        {
            if found.is_none_or(|b| load.run.rps > b.run.rps) {
                found = Some(load);
            }
        }
        found
    }

    pub fn ceiling(&self, step: Step, shape: Shape) -> Option<f64> {
        self.ceilings
            .iter()
            .find(|c| c.step == step && c.shape == shape)
            .and_then(|c| c.best())
    }

    pub fn envoy_rps(&self, path: &EnvoyPath) -> Option<f64> {
        self.envoy
            .iter()
            .rfind(|l| &l.path == path)
            .map(|l| l.wrk.rps)
    }

    /// `role`'s peer as measured in this run (straight, or behind Envoy's ratelimit filter),
    /// else the orientation figure.
    pub fn reference(
        &self,
        role: Role,
        through_envoy: bool,
        orientation: &str,
        goal: f64,
    ) -> Reference {
        let measured = self.peer_of(role).and_then(|name| {
            if through_envoy {
                let path = EnvoyPath::PeerRateLimit { peer: name.into() };
                Some((format!("Envoy + {name} ratelimit"), self.envoy_rps(&path)?))
            } else {
                Some((name.to_string(), self.peer_best(name, Shape::Hot)?.run.rps))
            }
        });
        match measured {
            Some((who, rps)) => Reference {
                text: format!("{who} ({rps:.0}, this run)"),
                goal: rps,
            },
            None => Reference {
                text: orientation.into(),
                goal,
            },
        }
    }
}

/// `a / b` as a percentage.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.0}%", 100.0 * a / b),
        _ => "n/a".into(),
    }
}

/// A goal that is a multiple of a figure, rounded as the table shows it.
fn times(figure: Option<f64>, factor: f64) -> Option<f64> {
    figure.map(|f| (f * factor).round())
}

/// A row of the targets table: the figure, the goal, and whether it is met.
pub fn target_row(text: &str, measured: Option<f64>, goal: Option<f64>) -> String {
    match (measured, goal) {
        (Some(v), Some(g)) => {
            let met = if v >= g { "met" } else { "not met" };
            format!(
                "| {text} | {v:.0} | {g:.0} | {met} ({:.0}%) |",
                100.0 * v / g
            )
        }
        _ => {
            let goal = goal.map_or("—".into(), |g| format!("{g:.0}"));
            format!("| {text} | not measured | {goal} | — |")
        }
    }
}

/// A tollgate figure in the peer table.
fn mark(near: Option<Near>) -> String {
    match near {
        None => "—".into(),
        Some(Near {
            rps,
            right_before: true,
        }) => format!("{rps:.0} †"),
        Some(Near { rps, .. }) => format!("{rps:.0}"),
    }
}

fn shown(backend: Backend) -> &'static str {
    match backend {
        Backend::Embedded => "embedded",
        Backend::Postgres => "PostgreSQL + Redis",
    }
}

fn keys(shape: Shape, in_flight: u32, set_size: usize) -> String {
    match shape {
        Shape::Hot => format!("1; 4 conns × {} streams", in_flight / 4),
        Shape::Hot32 => format!("1; {in_flight} conns × 1 stream"),
        Shape::Spread => format!("{in_flight} of {set_size}; {in_flight} conns × 1 stream"),
    }
}

/// p50, p99 and p99.9 in ms, as table cells.
fn latency_cells(run: &H2loadRun) -> String {
    match run.percentiles_ms() {
        Some([p50, p99, p999]) => format!("{p50:.2} | {p99:.2} | {p999:.2}"),
        None => "n/a | n/a | n/a".into(),
    }
}

/// The whole report; `date` is when it was made.
pub fn render(r: &Results, date: &str) -> String {
    let mut page = Vec::new();
    let run = &r.run;
    let n = run.in_flight;
    page.push(format!(
        "tollgate {}, {date}, {} cores, {} s per load, {n} requests in flight, request log {}",
        run.describe,
        run.cores,
        run.duration,
        if run.request_log { "on" } else { "off" }
    ));
    page.push(String::new());
    grpc_table(r, &mut page);
    ceiling_tables(r, &mut page);
    tls_table(r, &mut page);
    envoy_table(r, &mut page);
    peer_table(r, &mut page);
    memory_table(r, &mut page);
    targets_table(r, &mut page);
    page.join("\n") + "\n"
}

fn grpc_table(r: &Results, page: &mut Vec<String>) {
    let rows: Vec<&TollgateLoad> = r
        .tollgate
        .iter()
        .filter(|l| l.next_to.is_none() && !l.tls_part)
        .collect();
    if rows.is_empty() {
        return;
    }
    let n = r.run.in_flight;
    page.push(format!(
        "**gRPC straight to tollgate** (h2load, {n} requests in flight; every answer checked gRPC OK and allowed)"
    ));
    page.push(String::new());
    page.push("| request | backend | keys | req/s | p50 ms | p99 ms | p99.9 ms | CPU s / 1k | peak RSS MiB |".into());
    page.push("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |".into());
    for l in rows {
        let what = match l.request {
            Request::CheckWithQuotas if l.batched => "Check, key with quotas, quota.mode batched",
            Request::CheckWithQuotas => "Check, key with quotas",
            Request::CheckWithoutQuotas => "Check, key without quotas",
            Request::ShouldRateLimit => "ShouldRateLimit, 1 descriptor",
        };
        let cpu = if l.decisions.decided > 0.0 {
            let seconds = l.cpu_ticks as f64 / r.run.clk_tck;
            format!("{:.3}", seconds / (l.decisions.decided / 1000.0))
        } else {
            "n/a".into()
        };
        page.push(format!(
            "| {what} | {} | {} | {:.0} | {} | {cpu} | {} |",
            shown(l.backend),
            keys(l.shape, n, l.set_size),
            l.run.rps,
            latency_cells(&l.run),
            l.peak_rss_kib / 1024
        ));
    }
    page.push(String::new());
}

/// tollgate's CPU per decision of a load, in µs.
fn cpu_us_per_decision(r: &Results, l: &TollgateLoad) -> Option<f64> {
    (l.decisions.decided > 0.0)
        .then(|| l.cpu_ticks as f64 / r.run.clk_tck / l.decisions.decided * 1e6)
}

/// The TLS part: each plaintext load next to the TLS load that ran right after it, and what
/// TLS cost per Check (CPU and median latency).
fn tls_table(r: &Results, page: &mut Vec<String>) {
    let loads: Vec<&TollgateLoad> = r.tollgate.iter().filter(|l| l.tls_part).collect();
    let pairs: Vec<(&TollgateLoad, &TollgateLoad)> = loads
        .windows(2)
        .filter(|w| {
            !w[0].tls
                && w[1].tls
                && (w[0].backend, w[0].request, w[0].shape)
                    == (w[1].backend, w[1].request, w[1].shape)
        })
        .map(|w| (w[0], w[1]))
        .collect();
    if pairs.is_empty() {
        return;
    }
    page.push(format!(
        "**TLS on the gRPC port** (h2load, {} requests in flight, plaintext then TLS right after; TLS 1.3, ALPN h2)",
        r.run.in_flight
    ));
    page.push(String::new());
    page.push("| request | backend | keys | gRPC | req/s | p50 ms | p99 ms | p99.9 ms | CPU µs / Check | TLS costs per Check |".into());
    page.push("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |".into());
    for (plain, tls) in pairs {
        let what = match plain.request {
            Request::CheckWithQuotas => "Check, key with quotas",
            Request::CheckWithoutQuotas => "Check, key without quotas",
            Request::ShouldRateLimit => "ShouldRateLimit, 1 descriptor",
        };
        let cpu = |l| cpu_us_per_decision(r, l);
        let p50 = |l: &TollgateLoad| l.run.percentiles_ms().map(|p| p[0]);
        let cost = match (cpu(plain), cpu(tls), p50(plain), p50(tls)) {
            (Some(a), Some(b), Some(pa), Some(pb)) => format!(
                "{:+.1} µs CPU ({:+.0} %), {:+.3} ms p50, {:+.0} % req/s",
                b - a,
                (b / a - 1.0) * 100.0,
                pb - pa,
                (tls.run.rps / plain.run.rps - 1.0) * 100.0
            ),
            _ => "n/a".into(),
        };
        for (l, grpc, cost) in [(plain, "plaintext", String::new()), (tls, "TLS", cost)] {
            page.push(format!(
                "| {what} | {} | {} | {grpc} | {:.0} | {} | {} | {cost} |",
                shown(l.backend),
                keys(l.shape, r.run.in_flight, l.set_size),
                l.run.rps,
                latency_cells(&l.run),
                cpu(l).map_or("n/a".into(), |c| format!("{c:.1}")),
            ));
        }
    }
    page.push(String::new());
}

fn ceiling_tables(r: &Results, page: &mut Vec<String>) {
    if r.ceilings.is_empty() {
        return;
    }
    page.push("**Ceilings** (the same atomic step without tollgate)".into());
    page.push(String::new());
    page.push("| step | rows / keys | per s (best of two runs: first, second) |".into());
    page.push("| --- | --- | ---: |".into());
    for c in &r.ceilings {
        let step = match c.step {
            Step::Redis => format!(
                "Redis: `fixed_window.lua` by EVALSHA (redis-benchmark, {} clients)",
                r.run.in_flight
            ),
            Step::Postgres => format!(
                "PostgreSQL: `CONSUME_SQL` (pgbench -M prepared, 16 clients, synchronous_commit={})",
                r.synchronous_commit
            ),
            Step::Sqlite => {
                "SQLite: `CONSUME_SQL` (one connection, WAL, synchronous=NORMAL)".into()
            }
        };
        let shape = if c.shape == Shape::Hot {
            "hot"
        } else {
            "spread"
        };
        let rounds: Vec<String> = c.rounds.iter().map(|v| format!("{v:.0}")).collect();
        let best = c.best().unwrap_or_default();
        page.push(format!(
            "| {step} | {shape} | {best:.0} ({}) |",
            rounds.join(", ")
        ));
    }
    page.push(String::new());
    page.push("| tollgate as a fraction of its ceiling | hot | spread |".into());
    page.push("| --- | ---: | ---: |".into());
    let fractions = [
        (
            "Check with quotas, embedded / SQLite UPDATE",
            Backend::Embedded,
            Request::CheckWithQuotas,
            Step::Sqlite,
        ),
        (
            "Check with quotas, PostgreSQL + Redis / pgbench UPDATE",
            Backend::Postgres,
            Request::CheckWithQuotas,
            Step::Postgres,
        ),
        (
            "ShouldRateLimit, Redis / Redis script",
            Backend::Postgres,
            Request::ShouldRateLimit,
            Step::Redis,
        ),
    ];
    for (text, backend, request, step) in fractions {
        let at = |shape| {
            ratio(
                r.rps(backend, request, shape, false),
                r.ceiling(step, shape),
            )
        };
        page.push(format!(
            "| {text} | {} | {} |",
            at(Shape::Hot),
            at(Shape::Spread)
        ));
    }
    page.push(String::new());
}

fn envoy_table(r: &Results, page: &mut Vec<String>) {
    if r.envoy.is_empty() {
        return;
    }
    page.push(format!(
        "**Through Envoy** (wrk, {} connections, HTTP/1.1; Envoy --concurrency {}; one hot key)",
        r.run.in_flight, r.run.envoy_concurrency
    ));
    page.push(String::new());
    page.push("| path | req/s | p50 ms | p99 ms | p99.9 ms | added p50 ms | added p99 ms | Envoy CPU µs / req | service CPU µs / req |".into());
    page.push("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |".into());
    let direct = r
        .envoy
        .iter()
        .find(|l| l.path == EnvoyPath::Direct)
        .map(|l| l.wrk);
    for l in &r.envoy {
        let what = match &l.path {
            EnvoyPath::Direct => "Envoy → upstream".to_string(),
            EnvoyPath::ExtAuthz { backend, batched } => format!(
                "Envoy + tollgate ext_authz (Check, key with quotas; {}{}) → upstream",
                shown(*backend),
                if *batched { ", quota.mode batched" } else { "" }
            ),
            EnvoyPath::RateLimit { backend } => format!(
                "Envoy + tollgate ratelimit (1 descriptor; {}) → upstream",
                shown(*backend)
            ),
            EnvoyPath::PeerRateLimit { peer } => {
                format!("Envoy + {peer} ratelimit (1 descriptor) → upstream")
            }
        };
        let w = l.wrk;
        let added = match direct {
            Some(d) if l.path != EnvoyPath::Direct => {
                format!("{:+.2} | {:+.2}", w.p50_ms - d.p50_ms, w.p99_ms - d.p99_ms)
            }
            _ => "— | —".into(),
        };
        let per_request = |ticks: Option<u64>| match ticks {
            Some(t) if w.requests > 0 => {
                format!("{:.1}", micros_per(t, r.run.clk_tck, w.requests as f64))
            }
            _ => "—".into(),
        };
        let service = if l.path == EnvoyPath::Direct {
            "—".into()
        } else {
            per_request(l.server_ticks)
        };
        page.push(format!(
            "| {what} | {:.0} | {:.3} | {:.3} | {:.3} | {added} | {} | {service} |",
            w.rps,
            w.p50_ms,
            w.p99_ms,
            w.p999_ms,
            per_request(l.envoy_ticks),
        ));
    }
    page.push(String::new());
}

fn peer_table(r: &Results, page: &mut Vec<String>) {
    if r.peer_loads.is_empty() {
        return;
    }
    let peers: Vec<String> = r
        .peers
        .iter()
        .map(|p| format!("{} at {}", p.name, p.addr))
        .collect();
    page.push(format!(
        "**ShouldRateLimit: tollgate vs peer rate limit services** (same bodies, same load; {})",
        peers.join(", ")
    ));
    page.push(String::new());
    page.push("| peer | keys | peer req/s | p50 ms | p99 ms | p99.9 ms | peer CPU µs / req | tollgate embedded req/s | embedded / peer | tollgate embedded CPU µs / req | tollgate PostgreSQL + Redis req/s | PostgreSQL + Redis / peer | tollgate PostgreSQL + Redis CPU µs / req |".into());
    page.push("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |".into());
    for peer in &r.peers {
        for shape in Shape::ALL {
            let Some(load) = r.peer_best(&peer.name, shape) else {
                continue;
            };
            let theirs = load.run.rps;
            let near = |backend| r.near(backend, Request::ShouldRateLimit, shape, Some(&peer.name));
            let (embedded, postgres) = (near(Backend::Embedded), near(Backend::Postgres));
            let peer_cpu = match load.cpu_ticks {
                Some(t) if load.run.done > 0 => {
                    format!("{:.1}", micros_per(t, r.run.clk_tck, load.run.done as f64))
                }
                _ => "—".into(),
            };
            let tollgate_cpu = |near: Option<&TollgateLoad>| {
                near.and_then(|l| cpu_micros(l, r.run.clk_tck))
                    .map_or("—".into(), |us| format!("{us:.1}"))
            };
            let (embedded_load, postgres_load) = (
                r.near_load(
                    Backend::Embedded,
                    Request::ShouldRateLimit,
                    shape,
                    Some(&peer.name),
                ),
                r.near_load(
                    Backend::Postgres,
                    Request::ShouldRateLimit,
                    shape,
                    Some(&peer.name),
                ),
            );
            page.push(format!(
                "| {} | {} | {theirs:.0} | {} | {peer_cpu} | {} | {} | {} | {} | {} | {} |",
                peer.name,
                keys(shape, r.run.in_flight, load.set_size),
                latency_cells(&load.run),
                mark(embedded),
                ratio(embedded.map(|n| n.rps), Some(theirs)),
                tollgate_cpu(embedded_load),
                mark(postgres),
                ratio(postgres.map(|n| n.rps), Some(theirs)),
                tollgate_cpu(postgres_load),
            ));
        }
    }
    page.push(String::new());
    page.push("On one hot key, each side's better of two loads, alternating: tollgate (†, the same load again, a fresh tollgate each time) right before the peer. The other tollgate figures are the gRPC part's.".into());
    page.push(String::new());
}

fn memory_table(r: &Results, page: &mut Vec<String>) {
    let Some(m) = &r.memory else {
        return;
    };
    page.push("**Memory** (embedded default, after every cached key was checked once)".into());
    page.push(String::new());
    page.push("| keys in the database | keys cached | RSS MiB | peak RSS MiB |".into());
    page.push("| ---: | ---: | ---: | ---: |".into());
    page.push(format!(
        "| {} | {} | {} | {} |",
        m.keys,
        m.cached,
        m.rss_kib / 1024,
        m.peak_rss_kib / 1024
    ));
    page.push(String::new());
}

fn targets_table(r: &Results, page: &mut Vec<String>) {
    page.push("**Targets** (a reference named \"(orientation)\" is the Limitador figure the targets were set with, not measured here; one named after a peer was measured in this run, and compared with tollgate measured right before it)".into());
    page.push(String::new());
    page.push("| target | measured | goal | |".into());
    page.push("| --- | ---: | ---: | --- |".into());
    use Backend::{Embedded, Postgres};
    use Request::{CheckWithQuotas, CheckWithoutQuotas, ShouldRateLimit};
    let memory = r.reference(
        Role::Memory,
        false,
        "Limitador in memory (78k, orientation)",
        78_000.0,
    );
    let redis = r.reference(
        Role::Redis,
        false,
        "Limitador+Redis (9.9k, orientation)",
        9_900.0,
    );
    let cached = r.reference(
        Role::Cached,
        false,
        "Limitador cached (28k, orientation)",
        28_000.0,
    );
    let envoy = r.reference(
        Role::Memory,
        true,
        "Envoy + Limitador ratelimit (11.7k, orientation)",
        11_700.0,
    );
    let near = |backend, request, role| {
        r.near(backend, request, Shape::Hot, r.peer_of(role))
            .map(|n| n.rps)
    };
    let grpc = |backend, request, shape, batched| r.rps(backend, request, shape, batched);
    let pg = |shape| r.ceiling(Step::Postgres, shape);
    let authz = |batched| {
        r.envoy_rps(&EnvoyPath::ExtAuthz {
            backend: Postgres,
            batched,
        })
    };
    let rows = [
        (
            format!("ShouldRateLimit on Redis, hot ≥ 4 × {}", redis.text),
            near(Postgres, ShouldRateLimit, Role::Redis),
            times(Some(redis.goal), 4.0),
        ),
        (
            format!("ShouldRateLimit on Redis, hot > {}", cached.text),
            near(Postgres, ShouldRateLimit, Role::Cached),
            Some(cached.goal),
        ),
        (
            format!("ShouldRateLimit embedded, hot ≥ {}", memory.text),
            near(Embedded, ShouldRateLimit, Role::Memory),
            Some(memory.goal),
        ),
        (
            format!("Check without quotas embedded, hot ≥ {}", memory.text),
            near(Embedded, CheckWithoutQuotas, Role::Memory),
            Some(memory.goal),
        ),
        (
            "Check with quotas embedded, hot ≥ 80% of SQLite UPDATE".into(),
            grpc(Embedded, CheckWithQuotas, Shape::Hot, false),
            times(r.ceiling(Step::Sqlite, Shape::Hot), 0.8),
        ),
        (
            "Check on PostgreSQL + Redis, hot row ≥ 80% of pgbench".into(),
            grpc(Postgres, CheckWithQuotas, Shape::Hot, false),
            times(pg(Shape::Hot), 0.8),
        ),
        (
            "Check on PostgreSQL + Redis, spread rows ≥ 90% of pgbench".into(),
            grpc(Postgres, CheckWithQuotas, Shape::Spread, false),
            times(pg(Shape::Spread), 0.9),
        ),
        (
            "Check on PostgreSQL + Redis, quota.mode batched, hot ≥ 10 × pgbench hot row".into(),
            grpc(Postgres, CheckWithQuotas, Shape::Hot, true),
            times(pg(Shape::Hot), 10.0),
        ),
        (
            format!(
                "Envoy + tollgate ext_authz, PostgreSQL + Redis, batched ≥ {}",
                envoy.text
            ),
            authz(true),
            Some(envoy.goal),
        ),
        (
            format!(
                "Envoy + tollgate ext_authz, PostgreSQL + Redis, exact ≥ {}",
                envoy.text
            ),
            authz(false),
            Some(envoy.goal),
        ),
    ];
    for (text, measured, goal) in rows {
        page.push(target_row(&text, measured, goal));
    }
    let rss = "Peak RSS ≤ 64 MiB, 1 million keys in the database, 100,000 cached";
    page.push(match &r.memory {
        Some(m) => {
            let peak = m.peak_rss_kib / 1024;
            let met = if peak <= 64 { "met" } else { "not met" };
            format!("| {rss} | {peak} MiB | 64 MiB | {met} |")
        }
        None => format!("| {rss} | not measured | 64 MiB | — |"),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{Decisions, Peer, PeerLoad, Run};

    fn h2load(rps: f64) -> H2loadRun {
        H2loadRun {
            rps,
            started: 100,
            done: 100,
            errors: 0,
            latencies_us: (1..=1000).collect(),
        }
    }

    fn tollgate(backend: Backend, request: Request, shape: Shape, rps: f64) -> TollgateLoad {
        TollgateLoad {
            backend,
            request,
            shape,
            batched: false,
            next_to: None,
            tls_part: false,
            tls: false,
            set_size: 1000,
            run: h2load(rps),
            decisions: Decisions {
                decided: 30_000.0,
                ..Default::default()
            },
            cpu_ticks: 150,
            peak_rss_kib: 24_600,
        }
    }

    fn right_before(load: TollgateLoad, peer: &str, round: u32) -> TollgateLoad {
        TollgateLoad {
            next_to: Some((peer.into(), round)),
            ..load
        }
    }

    fn peer_load(peer: &str, shape: Shape, round: u32, rps: f64) -> PeerLoad {
        PeerLoad {
            peer: peer.into(),
            shape,
            round,
            set_size: 1000,
            run: h2load(rps),
            cpu_ticks: None,
        }
    }

    fn results(peers: &[&str]) -> Results {
        Results {
            run: Run {
                describe: "abc1234".into(),
                cores: 2,
                duration: 3,
                in_flight: 32,
                request_log: true,
                envoy_concurrency: "2".into(),
                clk_tck: 100.0,
            },
            peers: peers
                .iter()
                .enumerate()
                .map(|(i, name)| Peer {
                    name: (*name).into(),
                    addr: format!("127.0.0.1:{}", 18081 + i),
                })
                .collect(),
            tollgate: Vec::new(),
            peer_loads: Vec::new(),
            ceilings: Vec::new(),
            synchronous_commit: "on".into(),
            envoy: Vec::new(),
            memory: None,
        }
    }

    #[test]
    fn targets_met_and_not() {
        assert_eq!(
            target_row("t", Some(120.0), Some(100.0)),
            "| t | 120 | 100 | met (120%) |"
        );
        assert_eq!(
            target_row("t", Some(100.0), Some(100.0)),
            "| t | 100 | 100 | met (100%) |"
        );
        assert_eq!(
            target_row("t", Some(49.6), Some(100.0)),
            "| t | 50 | 100 | not met (50%) |"
        );
        assert_eq!(
            target_row("t", None, Some(39600.0)),
            "| t | not measured | 39600 | — |"
        );
        assert_eq!(
            target_row("t", Some(1.0), None),
            "| t | not measured | — | — |"
        );
    }

    #[test]
    fn the_tls_table_pairs_each_plaintext_load_with_the_tls_load_after_it() {
        let mut r = results(&[]);
        let plain = TollgateLoad {
            tls_part: true,
            ..tollgate(
                Backend::Embedded,
                Request::CheckWithQuotas,
                Shape::Hot,
                10_000.0,
            )
        };
        let tls = TollgateLoad {
            tls: true,
            cpu_ticks: 180,
            ..tollgate(
                Backend::Embedded,
                Request::CheckWithQuotas,
                Shape::Hot,
                9_000.0,
            )
        };
        let tls = TollgateLoad {
            tls_part: true,
            ..tls
        };
        // The gRPC part's own load is no part of it, and the TLS part's are not in its table.
        let grpc_part = tollgate(Backend::Embedded, Request::CheckWithQuotas, Shape::Hot, 1.0);
        r.tollgate = vec![grpc_part, plain, tls];
        let mut page = Vec::new();
        tls_table(&r, &mut page);
        let rows: Vec<&String> = page.iter().filter(|l| l.starts_with("| Check")).collect();
        assert_eq!(rows.len(), 2, "{page:#?}");
        // 150 and 180 ticks at 100 Hz over 30,000 decisions: 50 and 60 µs.
        assert!(
            rows[0].contains("| plaintext | 10000 |") && rows[0].contains("| 50.0 |"),
            "{}",
            rows[0]
        );
        assert!(
            rows[1].contains("| TLS | 9000 |")
                && rows[1].contains("| 60.0 | +10.0 µs CPU (+20 %), +0.000 ms p50, -10 % req/s |"),
            "{}",
            rows[1]
        );
        assert_eq!(
            r.rps(
                Backend::Embedded,
                Request::CheckWithQuotas,
                Shape::Hot,
                false
            ),
            Some(1.0)
        );
        let mut grpc = Vec::new();
        grpc_table(&r, &mut grpc);
        assert_eq!(grpc.iter().filter(|l| l.starts_with("| Check")).count(), 1);
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(Some(16356.0), Some(9340.0)), "175%");
        assert_eq!(ratio(None, Some(1.0)), "n/a");
        assert_eq!(ratio(Some(1.0), None), "n/a");
        assert_eq!(ratio(Some(1.0), Some(0.0)), "n/a");
        assert_eq!(times(Some(9340.0), 0.8), Some(7472.0));
        assert_eq!(times(Some(2288.0), 10.0), Some(22880.0));
        assert_eq!(times(None, 4.0), None);
    }

    #[test]
    fn peer_roles_from_names() {
        let r = results(&["limitador-memory", "limitador-redis", "limitador-cached"]);
        assert_eq!(r.peer_of(Role::Memory), Some("limitador-memory"));
        assert_eq!(r.peer_of(Role::Redis), Some("limitador-redis"));
        assert_eq!(r.peer_of(Role::Cached), Some("limitador-cached"));
        // A cached-Redis peer is not the Redis one; the last of several wins.
        let r = results(&["redis-cached", "peer", "redis-a", "redis-b"]);
        assert_eq!(r.peer_of(Role::Redis), Some("redis-b"));
        assert_eq!(r.peer_of(Role::Cached), Some("redis-cached"));
        assert_eq!(r.peer_of(Role::Memory), None);
    }

    #[test]
    fn best_of_two_alternating_loads() {
        let mut r = results(&["limitador-memory"]);
        let rls = |rps| tollgate(Backend::Embedded, Request::ShouldRateLimit, Shape::Hot, rps);
        r.tollgate = vec![
            rls(38534.0),
            right_before(rls(51000.0), "limitador-memory", 1),
            right_before(rls(54646.0), "limitador-memory", 2),
        ];
        r.peer_loads = vec![
            peer_load("limitador-memory", Shape::Hot, 1, 50019.0),
            peer_load("limitador-memory", Shape::Hot, 2, 47000.0),
            peer_load("limitador-memory", Shape::Spread, 1, 23908.0),
        ];
        let best = r
            .peer_best("limitador-memory", Shape::Hot)
            .expect("a hot load");
        assert_eq!((best.round, best.run.rps), (1, 50019.0));
        assert_eq!(
            r.right_before(
                Backend::Embedded,
                Request::ShouldRateLimit,
                "limitador-memory"
            ),
            Some(54646.0)
        );
        // The gRPC part's figure is not one of the two.
        assert_eq!(
            r.rps(
                Backend::Embedded,
                Request::ShouldRateLimit,
                Shape::Hot,
                false
            ),
            Some(38534.0)
        );
        // A tie keeps the first.
        r.peer_loads[1].run.rps = 50019.0;
        let best = r
            .peer_best("limitador-memory", Shape::Hot)
            .expect("a hot load");
        assert_eq!(best.round, 1);
        assert!(r.peer_best("limitador-memory", Shape::Hot32).is_none());
    }

    #[test]
    fn near_prefers_the_load_right_before_the_peer() {
        let mut r = results(&["limitador-memory"]);
        let rls = |shape, rps| tollgate(Backend::Embedded, Request::ShouldRateLimit, shape, rps);
        r.tollgate = vec![
            rls(Shape::Hot, 38534.0),
            rls(Shape::Spread, 25184.0),
            right_before(rls(Shape::Hot, 54646.0), "limitador-memory", 1),
        ];
        let near = |shape, peer| r.near(Backend::Embedded, Request::ShouldRateLimit, shape, peer);
        let marked = |rps, right_before| Some(Near { rps, right_before });
        assert_eq!(
            near(Shape::Hot, Some("limitador-memory")),
            marked(54646.0, true)
        );
        assert_eq!(near(Shape::Hot, Some("other")), marked(38534.0, false));
        assert_eq!(near(Shape::Hot, None), marked(38534.0, false));
        assert_eq!(
            near(Shape::Spread, Some("limitador-memory")),
            marked(25184.0, false)
        );
        assert_eq!(near(Shape::Hot32, Some("limitador-memory")), None);
        assert_eq!(mark(near(Shape::Hot, Some("limitador-memory"))), "54646 †");
        assert_eq!(mark(near(Shape::Spread, None)), "25184");
        assert_eq!(mark(None), "—");
    }

    #[test]
    fn references_fall_back_to_the_orientation_figures() {
        let orientation = "Limitador in memory (78k, orientation)";
        // No peer; a peer by that name that was not measured; one that was.
        let r = results(&[]);
        let reference = r.reference(Role::Memory, false, orientation, 78_000.0);
        assert_eq!(
            (reference.text.as_str(), reference.goal),
            (orientation, 78_000.0)
        );
        let mut r = results(&["limitador-memory"]);
        let reference = r.reference(Role::Memory, false, orientation, 78_000.0);
        assert_eq!(
            (reference.text.as_str(), reference.goal),
            (orientation, 78_000.0)
        );
        r.peer_loads = vec![peer_load("limitador-memory", Shape::Hot, 1, 50019.0)];
        let reference = r.reference(Role::Memory, false, orientation, 78_000.0);
        assert_eq!(reference.text, "limitador-memory (50019, this run)");
        assert_eq!(reference.goal, 50019.0);
        // Through Envoy, the peer's Envoy row is the reference, not its straight figure.
        let reference = r.reference(Role::Memory, true, "Envoy (orientation)", 11_700.0);
        assert_eq!(reference.text, "Envoy (orientation)");
        r.envoy = vec![crate::results::EnvoyLoad {
            path: EnvoyPath::PeerRateLimit {
                peer: "limitador-memory".into(),
            },
            wrk: crate::tools::WrkReport {
                requests: 21912,
                rps: 7304.2,
                p50_ms: 4.11,
                p99_ms: 12.624,
                p999_ms: 19.289,
                errors: 0,
            },
            envoy_ticks: Some(300),
            server_ticks: Some(65),
        }];
        let reference = r.reference(Role::Memory, true, "Envoy (orientation)", 11_700.0);
        assert_eq!(
            reference.text,
            "Envoy + limitador-memory ratelimit (7304, this run)"
        );
        assert_eq!(reference.goal, 7304.2);
    }

    fn targets(r: &Results) -> Vec<String> {
        let page = render(r, "2026-11-27 01:26 UTC");
        let start = page.find("| target |").expect("the targets table");
        page[start..].lines().skip(2).map(String::from).collect()
    }

    #[test]
    fn targets_without_peers_use_the_orientation_figures() {
        let mut r = results(&[]);
        r.tollgate = vec![
            tollgate(
                Backend::Embedded,
                Request::ShouldRateLimit,
                Shape::Hot,
                39270.0,
            ),
            tollgate(
                Backend::Postgres,
                Request::ShouldRateLimit,
                Shape::Hot,
                23241.0,
            ),
        ];
        let rows = targets(&r);
        assert_eq!(rows.len(), 11);
        assert_eq!(
            rows[0],
            "| ShouldRateLimit on Redis, hot ≥ 4 × Limitador+Redis (9.9k, orientation) | 23241 | 39600 | not met (59%) |"
        );
        assert_eq!(
            rows[2],
            "| ShouldRateLimit embedded, hot ≥ Limitador in memory (78k, orientation) | 39270 | 78000 | not met (50%) |"
        );
        assert_eq!(
            rows[3],
            "| Check without quotas embedded, hot ≥ Limitador in memory (78k, orientation) | not measured | 78000 | — |"
        );
        assert_eq!(
            rows[4],
            "| Check with quotas embedded, hot ≥ 80% of SQLite UPDATE | not measured | — | — |"
        );
        assert_eq!(
            rows[10],
            "| Peak RSS ≤ 64 MiB, 1 million keys in the database, 100,000 cached | not measured | 64 MiB | — |"
        );
    }

    #[test]
    fn targets_with_peers_compare_with_tollgate_right_before_them() {
        let mut r = results(&["limitador-memory", "limitador-redis", "limitador-cached"]);
        let rls = |backend, rps| tollgate(backend, Request::ShouldRateLimit, Shape::Hot, rps);
        r.tollgate = vec![
            rls(Backend::Postgres, 29623.0),
            right_before(rls(Backend::Postgres, 34022.0), "limitador-redis", 1),
            right_before(rls(Backend::Postgres, 30000.0), "limitador-redis", 2),
            right_before(rls(Backend::Postgres, 33733.0), "limitador-cached", 2),
        ];
        r.peer_loads = vec![
            peer_load("limitador-redis", Shape::Hot, 1, 12490.0),
            peer_load("limitador-redis", Shape::Hot, 2, 12000.0),
            peer_load("limitador-cached", Shape::Hot, 1, 19097.0),
        ];
        r.memory = Some(crate::results::Memory {
            keys: 1_000_000,
            cached: 100_000,
            rss_kib: 63_900,
            peak_rss_kib: 64_600,
        });
        let rows = targets(&r);
        assert_eq!(
            rows[0],
            "| ShouldRateLimit on Redis, hot ≥ 4 × limitador-redis (12490, this run) | 34022 | 49960 | not met (68%) |"
        );
        assert_eq!(
            rows[1],
            "| ShouldRateLimit on Redis, hot > limitador-cached (19097, this run) | 33733 | 19097 | met (177%) |"
        );
        // The in-memory peer was named but not measured.
        assert_eq!(
            rows[2],
            "| ShouldRateLimit embedded, hot ≥ Limitador in memory (78k, orientation) | not measured | 78000 | — |"
        );
        assert_eq!(
            rows[10],
            "| Peak RSS ≤ 64 MiB, 1 million keys in the database, 100,000 cached | 63 MiB | 64 MiB | met |"
        );
    }

    #[test]
    fn peer_rows_mark_the_figures_measured_right_before() {
        let mut r = results(&["limitador-memory"]);
        let rls = |backend, shape, rps| tollgate(backend, Request::ShouldRateLimit, shape, rps);
        r.tollgate = vec![
            rls(Backend::Embedded, Shape::Hot, 38534.0),
            rls(Backend::Postgres, Shape::Hot, 29623.0),
            rls(Backend::Postgres, Shape::Spread, 13300.0),
            right_before(
                rls(Backend::Embedded, Shape::Hot, 54646.0),
                "limitador-memory",
                1,
            ),
        ];
        r.peer_loads = vec![
            peer_load("limitador-memory", Shape::Hot, 1, 50019.0),
            peer_load("limitador-memory", Shape::Spread, 1, 23908.0),
        ];
        let page = render(&r, "2026-11-27 01:26 UTC");
        assert!(page.contains("(same bodies, same load; limitador-memory at 127.0.0.1:18081)"));
        assert!(page.contains(
            "| limitador-memory | 1; 4 conns × 8 streams | 50019 | 0.50 | 0.99 | 1.00 | — | 54646 † | 109% | 50.0 | 29623 | 59% | 50.0 |"
        ));
        assert!(page.contains(
            "| limitador-memory | 32 of 1000; 32 conns × 1 stream | 23908 | 0.50 | 0.99 | 1.00 | — | — | n/a | — | 13300 | 56% | 50.0 |"
        ));
        assert!(!page.contains("1; 32 conns × 1 stream"));
    }
}
