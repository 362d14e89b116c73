//! Runs against a cluster (`--servers`): which node each client connects to, and the inter-node traffic
//! the nodes report on `GET /metrics`, scraped by the coordinator around the run's main phase.
//!
//! A node outside a cluster has no `switchboard_cluster_messages_sent_total`: it counts as 0.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::time::Duration;

use clap::ValueEnum;

use crate::report::Report;
use crate::spec::Scenario;
use crate::Error;

/// Inter-node messages a node sent, by `kind` label.
const INTERNODE: &str = "switchboard_cluster_messages_sent_total";
/// Frames a node pushed to its connections' queues.
const DELIVERIES: &str = "switchboard_deliveries_total";
/// The kinds a message's own path uses (forward, fan-out, answers to the sender's node): always reported;
/// other kinds only when they changed.
const MESSAGE_KINDS: [&str; 3] = ["send", "deliver", "answers"];
/// One scrape may take this long.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the two members of each DM pair connect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum Placement {
    /// Both members of pair i on node i mod n.
    #[default]
    Same,
    /// The pair's first member on node i mod n, the second on node (i + 1) mod n: every message crosses
    /// nodes, whichever node hosts the conversation.
    Cross,
}

/// The node (index into the server list) that client `i` connects to, over `nodes` nodes.
///
/// DM pairs are clients `2k` and `2k + 1` (both send); a group's senders are its first `senders` clients.
pub(crate) fn node_of(
    scenario: Scenario,
    placement: Placement,
    i: usize,
    senders: usize,
    nodes: usize,
) -> usize {
    let nodes = nodes.max(1);
    match scenario {
        Scenario::Dm => {
            let pair = i / 2;
            match placement {
                Placement::Same => pair % nodes,
                Placement::Cross => (pair + i % 2) % nodes,
            }
        }
        Scenario::Group if i < senders.max(1) => 0,
        Scenario::Group | Scenario::Idle | Scenario::Storm => i % nodes,
    }
}

/// The placement as the report names it.
pub(crate) fn placement_name(scenario: Scenario, placement: Placement) -> &'static str {
    match (scenario, placement) {
        (Scenario::Dm, Placement::Same) => "same",
        (Scenario::Dm, Placement::Cross) => "cross",
        (Scenario::Group, _) => "round-robin,senders-on-node-0",
        (Scenario::Idle | Scenario::Storm, _) => "round-robin",
    }
}

/// The counters this tool reads from one node's `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct NodeCounters {
    /// `switchboard_cluster_messages_sent_total` by `kind`.
    pub(crate) internode: BTreeMap<String, f64>,
    /// `switchboard_deliveries_total`.
    pub(crate) deliveries: f64,
}

impl NodeCounters {
    /// Inter-node messages of every kind.
    pub(crate) fn internode_total(&self) -> f64 {
        self.internode.values().sum()
    }

    /// `self − before`, kind by kind (a kind absent before counts from 0).
    pub(crate) fn since(&self, before: &NodeCounters) -> NodeCounters {
        NodeCounters {
            internode: self
                .internode
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v - before.internode.get(k).copied().unwrap_or(0.0),
                    )
                })
                .collect(),
            deliveries: self.deliveries - before.deliveries,
        }
    }

    /// Field-wise sum.
    pub(crate) fn add(&mut self, o: &NodeCounters) {
        for (k, v) in &o.internode {
            *self.internode.entry(k.clone()).or_default() += v;
        }
        self.deliveries += o.deliveries;
    }
}

/// Read the two counters from Prometheus text (`name{labels} value [timestamp]`); absent means 0.
pub(crate) fn parse_metrics(text: &str) -> NodeCounters {
    let mut c = NodeCounters::default();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|ch: char| ch == '{' || ch.is_whitespace())
            .unwrap_or(line.len());
        let (name, rest) = line.split_at(name_end);
        let (labels, rest) = match rest.strip_prefix('{') {
            Some(r) => match r.rfind('}') {
                Some(end) => (&r[..end], &r[end + 1..]),
                None => continue,
            },
            None => ("", rest),
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        match name {
            INTERNODE => {
                let kind = label(labels, "kind").unwrap_or("(none)");
                *c.internode.entry(kind.to_string()).or_default() += value;
            }
            DELIVERIES => c.deliveries += value,
            _ => {}
        }
    }
    c
}

/// The value of label `key` in `a="x",key="y"` (values without escapes).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = labels;
    while let Some(eq) = rest.find("=\"") {
        let name = rest[..eq].trim_start_matches([',', ' ']);
        let after = &rest[eq + 2..];
        let end = after.find('"')?;
        if name == key {
            return Some(&after[..end]);
        }
        rest = &after[end + 1..];
    }
    None
}

/// One node's counters, or why they could not be read.
pub(crate) type Scrape = Vec<Result<NodeCounters, String>>;

async fn scrape_one(http: &reqwest::Client, node: SocketAddrV4) -> Result<NodeCounters, Error> {
    let reply = http.get(format!("http://{node}/metrics")).send().await?;
    let status = reply.status();
    if !status.is_success() {
        return Err(format!("GET /metrics: {status}").into());
    }
    Ok(parse_metrics(&reply.text().await?))
}

/// Every node's counters, read at (nearly) the same moment.
pub(crate) async fn scrape(nodes: &[SocketAddrV4]) -> Scrape {
    let http = match reqwest::Client::builder().timeout(SCRAPE_TIMEOUT).build() {
        Ok(h) => h,
        Err(e) => return nodes.iter().map(|_| Err(e.to_string())).collect(),
    };
    futures_util::future::join_all(nodes.iter().map(|&n| scrape_one(&http, n)))
        .await
        .into_iter()
        .map(|r| r.map_err(|e| e.to_string()))
        .collect()
}

/// Add the inter-node traffic between two scrapes to `report`. With `sent` (dm, group: the messages sent
/// between the scrapes) the figures are per message; otherwise they are counts. `span_s` is the span the
/// report's own deliveries per second are taken over. A failed scrape is listed under errors instead.
pub(crate) fn report_traffic(
    report: &mut Report,
    nodes: &[SocketAddrV4],
    before: &Scrape,
    after: &Scrape,
    sent: Option<u64>,
    span_s: f64,
) {
    let mut total = NodeCounters::default();
    let mut per_node = Vec::with_capacity(nodes.len());
    for ((node, b), a) in nodes.iter().zip(before).zip(after) {
        match (b, a) {
            (Ok(b), Ok(a)) => {
                let d = a.since(b);
                total.add(&d);
                per_node.push(d.internode_total());
            }
            (Err(e), _) | (_, Err(e)) => {
                *report
                    .errors
                    .entry(format!(
                        "metrics {node}: {}",
                        e.chars().take(60).collect::<String>()
                    ))
                    .or_default() += 1;
                return;
            }
        }
    }
    for kind in MESSAGE_KINDS {
        total.internode.entry(kind.to_string()).or_default();
    }
    total
        .internode
        .retain(|kind, v| *v != 0.0 || MESSAGE_KINDS.contains(&kind.as_str()));
    let all = total.internode_total();
    report.push(
        "internode_msgs",
        "inter-node messages sent (all nodes)",
        all,
        "",
    );
    for (k, (node, v)) in nodes.iter().zip(&per_node).enumerate() {
        report.push(
            &format!("internode_msgs_node{k}"),
            &format!("inter-node messages sent by node {k} ({node})"),
            *v,
            "",
        );
    }
    match sent {
        Some(sent) => {
            let per = |v: f64| v / sent.max(1) as f64;
            report.push(
                "internode_per_msg",
                "inter-node messages per message",
                per(all),
                "",
            );
            for (kind, v) in &total.internode {
                report.push(
                    &format!("internode_per_msg_{kind}"),
                    &format!("inter-node messages per message: {kind}"),
                    per(*v),
                    "",
                );
            }
            report.push(
                "server_deliveries",
                "deliveries counted by the nodes",
                total.deliveries,
                "",
            );
            report.push(
                "server_deliveries_per_s",
                "deliveries per second counted by the nodes",
                total.deliveries / span_s,
                "/s",
            );
        }
        None => {
            for (kind, v) in &total.internode {
                report.push(
                    &format!("internode_msgs_{kind}"),
                    &format!("inter-node messages sent: {kind}"),
                    *v,
                    "",
                );
            }
            report.push(
                "server_deliveries",
                "deliveries counted by the nodes",
                total.deliveries,
                "",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_clients_on_nodes() {
        let nodes = |s, p, senders, n, count| -> Vec<usize> {
            (0..count).map(|i| node_of(s, p, i, senders, n)).collect()
        };
        // DM pairs: same node, or the second member on the next node.
        assert_eq!(
            nodes(Scenario::Dm, Placement::Same, 0, 3, 8),
            [0, 0, 1, 1, 2, 2, 0, 0]
        );
        assert_eq!(
            nodes(Scenario::Dm, Placement::Cross, 0, 3, 8),
            [0, 1, 1, 2, 2, 0, 0, 1]
        );
        // One node: both placements put everyone on it.
        assert_eq!(nodes(Scenario::Dm, Placement::Cross, 0, 1, 4), [0; 4]);
        assert_eq!(nodes(Scenario::Dm, Placement::Cross, 0, 0, 2), [0; 2]);
        // A group: senders on node 0, the others round-robin.
        assert_eq!(
            nodes(Scenario::Group, Placement::Same, 2, 3, 7),
            [0, 0, 2, 0, 1, 2, 0]
        );
        assert_eq!(nodes(Scenario::Group, Placement::Same, 0, 2, 3), [0, 1, 0]);
        assert_eq!(
            nodes(Scenario::Storm, Placement::Same, 0, 3, 5),
            [0, 1, 2, 0, 1]
        );
        assert_eq!(nodes(Scenario::Idle, Placement::Cross, 0, 2, 3), [0, 1, 0]);
    }

    #[test]
    fn reads_the_counters_from_prometheus_text() {
        let text = "# TYPE switchboard_cluster_messages_sent_total counter\n\
            switchboard_cluster_messages_sent_total{kind=\"send\"} 3\n\
            switchboard_cluster_messages_sent_total{node=\"n1\",kind=\"deliver\"} 2.0 1700000000\n\
            switchboard_cluster_messages_sent_total{kind=\"send\",x=\"y\"} 4\n\
            switchboard_cluster_messages_sent_total_other{kind=\"send\"} 100\n\
            switchboard_cluster_messages_sent_total 1\n\
            switchboard_deliveries_total 42\n\
            switchboard_deliveries_total_bytes 9\n\
            switchboard_connections 7\n";
        let c = parse_metrics(text);
        assert_eq!(c.internode["send"], 7.0);
        assert_eq!(c.internode["deliver"], 2.0);
        assert_eq!(c.internode["(none)"], 1.0);
        assert_eq!(c.internode.len(), 3);
        assert_eq!(c.internode_total(), 10.0);
        assert_eq!(c.deliveries, 42.0);
        // A node outside a cluster: nothing to read, all zeros.
        let none = parse_metrics("switchboard_connections 3\n");
        assert_eq!(none, NodeCounters::default());
        assert_eq!(none.internode_total(), 0.0);
    }

    #[test]
    fn differences_and_sums() {
        let b = parse_metrics(
            "switchboard_cluster_messages_sent_total{kind=\"send\"} 3\nswitchboard_deliveries_total 10\n",
        );
        let a = parse_metrics(
            "switchboard_cluster_messages_sent_total{kind=\"send\"} 5\n\
             switchboard_cluster_messages_sent_total{kind=\"answers\"} 4\n\
             switchboard_deliveries_total 30\n",
        );
        let d = a.since(&b);
        assert_eq!(d.internode["send"], 2.0);
        assert_eq!(d.internode["answers"], 4.0);
        assert_eq!(d.deliveries, 20.0);
        let mut sum = d.clone();
        sum.add(&d);
        assert_eq!(sum.internode_total(), 12.0);
        assert_eq!(sum.deliveries, 40.0);
    }

    #[test]
    fn reports_per_message_figures_or_the_scrape_error() {
        let nodes: Vec<SocketAddrV4> = vec![
            "127.0.0.1:8080".parse().unwrap(),
            "127.0.0.2:8080".parse().unwrap(),
        ];
        let zero = parse_metrics("");
        let one = parse_metrics(
            "switchboard_cluster_messages_sent_total{kind=\"send\"} 50\n\
             switchboard_cluster_messages_sent_total{kind=\"deliver\"} 100\n\
             switchboard_deliveries_total 100\n",
        );
        let before: Scrape = vec![Ok(zero.clone()), Ok(zero.clone())];
        let after: Scrape = vec![Ok(one.clone()), Ok(zero.clone())];
        let mut r = Report::default();
        report_traffic(&mut r, &nodes, &before, &after, Some(100), 2.0);
        assert_eq!(r.get("internode_msgs"), Some(150.0));
        assert_eq!(r.get("internode_msgs_node0"), Some(150.0));
        assert_eq!(r.get("internode_msgs_node1"), Some(0.0));
        assert_eq!(r.get("internode_per_msg"), Some(1.5));
        assert_eq!(r.get("internode_per_msg_send"), Some(0.5));
        assert_eq!(r.get("internode_per_msg_deliver"), Some(1.0));
        assert_eq!(r.get("server_deliveries_per_s"), Some(50.0));
        // The message path's kinds are listed even when absent; others only when they changed.
        assert_eq!(r.get("internode_per_msg_answers"), Some(0.0));
        assert_eq!(r.get("internode_per_msg_snapshot"), None);
        assert!(r.errors.is_empty());

        let mut r = Report::default();
        report_traffic(&mut r, &nodes, &before, &after, None, 2.0);
        assert_eq!(r.get("internode_msgs_send"), Some(50.0));
        assert_eq!(r.get("internode_per_msg"), None);

        let failed: Scrape = vec![Ok(one), Err("connection refused".into())];
        let mut r = Report::default();
        report_traffic(&mut r, &nodes, &before, &failed, Some(100), 2.0);
        assert!(r.metrics.is_empty());
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    }
}
