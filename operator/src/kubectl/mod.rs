//! `kubectl tandem`: the plugin (binary `kubectl-tandem`) that shows volumes and steers them through
//! the operator. It only reads `MirroredVolume`s and their Events and edits `spec.primaryNode`; the
//! operator does the work. [`run`] takes a `kube::Client`, so tests drive it in-process against a
//! fake API server; [`render`] is the pure output.
//!
//! **Home node** (`failback`): the volume's first node, `status.nodes[0]` — slot a, where the
//! operator placed the primary when it created the volume. A failback is a switchover to it.

pub mod render;

use std::{collections::BTreeMap, io::Write, time::Duration};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::{api::core::v1::Event, jiff::Timestamp};
use kube::{
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams},
    Api, Client,
};
use serde_json::{json, Value};

use crate::crd::{MirroredVolume, SwitchoverPhase};
use render::{EventLine, Volume};

/// Command line of `kubectl-tandem` (kubectl runs it as `kubectl tandem ...`).
#[derive(Debug, Parser)]
#[command(
    name = "kubectl-tandem",
    version,
    about = "Show and steer Tandem MirroredVolumes (status, describe, switchover, failback)"
)]
pub struct Cli {
    /// The namespace (default: the kubeconfig context's, else `default`).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Every namespace (status).
    #[arg(short = 'A', long, global = true)]
    pub all_namespaces: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Human, global = true)]
    pub output: Output,
    /// The kubeconfig context to use (default: the current one).
    #[arg(long, global = true)]
    pub context: Option<String>,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Human,
    /// JSON for programs (stable field names).
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// A table of volumes: phase, primary and secondary node, lag, pending bytes, last takeover.
    Status {
        /// Redraw every --interval seconds, with progress bars for resync, drain, merge and move.
        #[arg(short = 'w', long)]
        watch: bool,
        #[arg(long, default_value_t = 2)]
        interval: u64,
    },
    /// One volume: both engines, replication, lease, switchover/takeover/move progress,
    /// conditions and recent events.
    Describe {
        /// The MirroredVolume's name.
        volume: String,
        #[arg(short = 'w', long)]
        watch: bool,
        #[arg(long, default_value_t = 2)]
        interval: u64,
    },
    /// Move the primary to the secondary's node (sets spec.primaryNode; the operator hands over
    /// without losing an acknowledged write).
    Switchover {
        /// The MirroredVolume's name.
        volume: String,
        /// The node to move the primary to (must be the secondary's; default: the secondary's).
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Move the primary back to the volume's home node (its first node, status.nodes[0]).
    Failback {
        /// The MirroredVolume's name.
        volume: String,
        #[command(flatten)]
        wait: Wait,
    },
}

#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Wait {
    /// Follow status.switchover until it is Done (exit 0) or Refused (exit 1).
    #[arg(long)]
    pub wait: bool,
    /// How long to wait, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

/// How often a `--wait` looks at the volume again.
const POLL: Duration = Duration::from_millis(500);

/// Runs one command with `client`; `default_ns` is the kubeconfig's namespace. Human and JSON output
/// go to `out` (a `--watch` on a terminal draws on stdout itself).
pub async fn run<W: Write>(
    client: Client,
    default_ns: &str,
    cli: &Cli,
    out: &mut W,
) -> anyhow::Result<()> {
    let ns = cli.namespace.as_deref().unwrap_or(default_ns);
    let kubectl = Kubectl {
        client,
        ns: ns.to_string(),
    };
    match &cli.command {
        Cmd::Status { watch, interval } => {
            let scope = if cli.all_namespaces { None } else { Some(ns) };
            if *watch {
                let all = cli.all_namespaces;
                return kubectl
                    .watch(*interval, out, cli.output, |k| async move {
                        let vols = k.list(scope).await?;
                        Ok((vols.clone(), Frame::Table(vols, all)))
                    })
                    .await;
            }
            let vols = kubectl.list(scope).await?;
            match cli.output {
                Output::Human => out.write_all(
                    render::table(&vols, cli.all_namespaces, Timestamp::now()).as_bytes(),
                )?,
                Output::Json => print_json(out, &render::table_json(&vols))?,
            }
        }
        Cmd::Describe {
            volume,
            watch,
            interval,
        } => {
            if *watch {
                return kubectl
                    .watch(*interval, out, cli.output, |k| async move {
                        let v = k.get(volume).await?;
                        let events = k.events(volume).await?;
                        Ok((vec![v.clone()], Frame::Describe(Box::new(v), events)))
                    })
                    .await;
            }
            let v = kubectl.get(volume).await?;
            let events = kubectl.events(volume).await?;
            match cli.output {
                Output::Human => {
                    out.write_all(render::describe(&v, &events, Timestamp::now()).as_bytes())?
                }
                Output::Json => print_json(out, &render::describe_json(&v, &events))?,
            }
        }
        Cmd::Switchover { volume, to, wait } => {
            let target = match to {
                Some(n) => Target::Node(n.clone()),
                None => Target::Secondary,
            };
            kubectl
                .switchover(volume, &target, *wait, cli.output, out)
                .await?;
        }
        Cmd::Failback { volume, wait } => {
            kubectl
                .switchover(volume, &Target::Home, *wait, cli.output, out)
                .await?;
        }
    }
    Ok(())
}

fn print_json<W: Write>(out: &mut W, v: &Value) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, v)?;
    writeln!(out)?;
    Ok(())
}

/// Where a switchover should put the primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The secondary's node.
    Secondary,
    /// A named node (must be the secondary's).
    Node(String),
    /// The volume's home node, `status.nodes[0]` (failback).
    Home,
}

/// What a switchover request comes to, decided from the volume alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ask {
    /// The primary is on that node already: nothing to do.
    Already(String),
    /// Set `spec.primaryNode` to `node`. `clear_first`: the operator already carried out (or
    /// refused) a request for that same node, and does each value once: clear it, let the operator
    /// drop the record, then set it again.
    Move {
        from: String,
        node: String,
        clear_first: bool,
    },
}

/// Decides a switchover of `v` toward `target`, or says why not (the text the user sees).
pub fn plan(v: &Volume, target: &Target) -> Result<Ask, String> {
    let id = format!("{}/{}", v.namespace(), v.name());
    let Some(s) = v.mv.status.as_ref() else {
        return Err(format!(
            "{id} has no status yet: the operator has not placed it"
        ));
    };
    let Some(primary) = s.primary.as_ref() else {
        return Err(format!(
            "{id} has no primary yet (phase {})",
            s.phase.as_str()
        ));
    };
    let node = match target {
        Target::Secondary => None,
        Target::Node(n) => Some(n.clone()),
        Target::Home => match s.nodes.first() {
            Some(h) => Some(h.clone()),
            None => return Err(format!("{id} has no nodes in its status: no home node")),
        },
    };
    if node.as_deref() == Some(primary.node.as_str()) {
        return Ok(Ask::Already(primary.node.clone()));
    }
    let Some(secondary) = s.secondary.as_ref() else {
        return Err(format!(
            "{id}: the secondary is unknown (status.secondary is empty): nothing to switch over to"
        ));
    };
    let node = node.unwrap_or_else(|| secondary.node.clone());
    if node != secondary.node {
        return Err(format!(
            "{id}: node {node} holds no engine of this volume (primary on {}, secondary on {})",
            primary.node, secondary.node
        ));
    }
    if let Some(w) = s.switchover.as_ref().filter(|w| render::running(w.phase)) {
        return Err(format!(
            "{id}: a switchover to {} is already running (phase {}{}); follow it with \
             `kubectl tandem describe {} --watch`",
            w.to,
            w.phase.as_str(),
            if w.message.is_empty() {
                String::new()
            } else {
                format!(": {}", w.message)
            },
            v.name()
        ));
    }
    let clear_first = v.mv.spec.primary_node.as_deref() == Some(node.as_str())
        || s.switchover.as_ref().is_some_and(|w| w.to == node);
    Ok(Ask::Move {
        from: primary.node.clone(),
        node,
        clear_first,
    })
}

/// What one watch pass draws.
enum Frame {
    Table(Vec<Volume>, bool),
    Describe(Box<Volume>, Vec<EventLine>),
}

struct Kubectl {
    client: Client,
    ns: String,
}

fn resource() -> ApiResource {
    ApiResource::erase::<MirroredVolume>(&())
}

/// A MirroredVolume from the API's JSON; `status.move` kept as it came.
fn volume(obj: DynamicObject) -> anyhow::Result<Volume> {
    let raw = serde_json::to_value(&obj)?;
    let moving = raw
        .get("status")
        .and_then(|s| s.get("move"))
        .filter(|m| !m.is_null())
        .cloned();
    let name = obj.metadata.name.clone().unwrap_or_default();
    let mv: MirroredVolume = serde_json::from_value(raw)
        .with_context(|| format!("MirroredVolume {name} does not parse"))?;
    Ok(Volume { mv, moving })
}

impl Kubectl {
    fn api(&self, ns: Option<&str>) -> Api<DynamicObject> {
        match ns {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &resource()),
            None => Api::all_with(self.client.clone(), &resource()),
        }
    }

    /// The volumes of `ns` (None: every namespace), by namespace and name.
    async fn list(&self, ns: Option<&str>) -> anyhow::Result<Vec<Volume>> {
        let list = self
            .api(ns)
            .list(&ListParams::default())
            .await
            .context("listing MirroredVolumes")?;
        let mut vols = list
            .items
            .into_iter()
            .map(volume)
            .collect::<anyhow::Result<Vec<_>>>()?;
        vols.sort_by(|a, b| (a.namespace(), a.name()).cmp(&(b.namespace(), b.name())));
        Ok(vols)
    }

    async fn get(&self, name: &str) -> anyhow::Result<Volume> {
        let obj = self
            .api(Some(&self.ns))
            .get(name)
            .await
            .with_context(|| format!("reading MirroredVolume {}/{name}", self.ns))?;
        volume(obj)
    }

    /// The volume's Events (core/v1, where events.k8s.io events show too), oldest first, the last 20.
    async fn events(&self, name: &str) -> anyhow::Result<Vec<EventLine>> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        let fields = format!("involvedObject.kind=MirroredVolume,involvedObject.name={name}");
        let list = api
            .list(&ListParams::default().fields(&fields))
            .await
            .with_context(|| format!("listing the events of {}/{name}", self.ns))?;
        let mut lines: Vec<EventLine> = list
            .items
            .into_iter()
            .map(|e| EventLine {
                time: e
                    .series
                    .as_ref()
                    .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
                    .or(e.last_timestamp.as_ref().map(|t| t.0))
                    .or(e.event_time.as_ref().map(|t| t.0))
                    .or(e.first_timestamp.as_ref().map(|t| t.0))
                    .or(e.metadata.creation_timestamp.as_ref().map(|t| t.0)),
                type_: e.type_.unwrap_or_default(),
                reason: e.reason.unwrap_or_default(),
                message: e.message.unwrap_or_default(),
                count: e
                    .series
                    .as_ref()
                    .map(|s| s.count.unwrap_or(1))
                    .or(e.count)
                    .unwrap_or(1),
            })
            .collect();
        lines.sort_by_key(|l| l.time);
        let keep = lines.len().saturating_sub(20);
        Ok(lines.split_off(keep))
    }

    async fn set_primary_node(&self, name: &str, node: Option<&str>) -> anyhow::Result<()> {
        let patch = json!({"spec": {"primaryNode": node}});
        self.api(Some(&self.ns))
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("patching spec.primaryNode of {}/{name}", self.ns))?;
        Ok(())
    }

    async fn switchover<W: Write>(
        &self,
        name: &str,
        target: &Target,
        wait: Wait,
        output: Output,
        out: &mut W,
    ) -> anyhow::Result<()> {
        let id = format!("{}/{name}", self.ns);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(wait.timeout);
        let v = self.get(name).await?;
        let (from, node, clear_first) = match plan(&v, target).map_err(anyhow::Error::msg)? {
            Ask::Already(node) => {
                match output {
                    Output::Human => writeln!(out, "{id}: the primary is on {node} already")?,
                    Output::Json => print_json(
                        out,
                        &json!({"namespace": self.ns, "name": name, "to": node, "phase": "Done", "changed": false}),
                    )?,
                }
                return Ok(());
            }
            Ask::Move {
                from,
                node,
                clear_first,
            } => (from, node, clear_first),
        };
        if clear_first {
            // The operator carries out each value of spec.primaryNode once: clear it and wait
            // until it dropped the old record, or setting the same value again would change nothing.
            self.set_primary_node(name, None).await?;
            loop {
                let v = self.get(name).await?;
                let old = v.mv.status.as_ref().and_then(|s| s.switchover.as_ref());
                if old.is_none_or(|w| w.to != node) {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("{id}: the operator did not clear the last switchover record in time");
                }
                tokio::time::sleep(POLL).await;
            }
        }
        self.set_primary_node(name, Some(&node)).await?;
        if output == Output::Human {
            writeln!(
                out,
                "{id}: switchover {from} -> {node} asked (spec.primaryNode={node})"
            )?;
        }
        if !wait.wait {
            match output {
                Output::Human => writeln!(
                    out,
                    "follow it with: kubectl tandem describe {name} -n {} --watch",
                    self.ns
                )?,
                Output::Json => print_json(
                    out,
                    &json!({"namespace": self.ns, "name": name, "from": from, "to": node, "phase": null, "changed": true}),
                )?,
            }
            return Ok(());
        }
        let mut last: Option<(SwitchoverPhase, String)> = None;
        loop {
            let v = self.get(name).await?;
            let s = v.mv.status.as_ref();
            if let Some(w) = s
                .and_then(|s| s.switchover.as_ref())
                .filter(|w| w.to == node)
            {
                let now = (w.phase, w.message.clone());
                if output == Output::Human && last.as_ref() != Some(&now) {
                    writeln!(out, "  {}: {}", w.phase.as_str(), w.message)?;
                }
                last = Some(now);
                match w.phase {
                    SwitchoverPhase::Done => {
                        match output {
                            Output::Human => writeln!(
                                out,
                                "{id}: the primary is on {node} at epoch {}",
                                s.map_or(0, |s| s.epoch)
                            )?,
                            Output::Json => print_json(
                                out,
                                &json!({"namespace": self.ns, "name": name, "from": from, "to": node,
                                        "phase": "Done", "epoch": w.epoch, "changed": true}),
                            )?,
                        }
                        return Ok(());
                    }
                    SwitchoverPhase::Refused => {
                        if output == Output::Json {
                            print_json(
                                out,
                                &json!({"namespace": self.ns, "name": name, "from": from, "to": node,
                                        "phase": "Refused", "message": w.message, "changed": false}),
                            )?;
                        }
                        bail!("{id}: switchover refused: {}", w.message);
                    }
                    _ => {}
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{id}: the switchover to {node} did not finish within {}s (last: {})",
                    wait.timeout,
                    last.map_or_else(
                        || "not picked up by the operator".to_string(),
                        |(p, m)| format!("{}: {m}", p.as_str())
                    )
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Redraws `frame` every `interval` seconds until Ctrl-C. On a terminal, indicatif draws the
    /// text and one bar per running resync, drain, merge or move; elsewhere each pass is printed
    /// (bars as text lines), without colour or cursor movement.
    async fn watch<'a, W, F, Fut>(
        &'a self,
        interval: u64,
        out: &mut W,
        output: Output,
        mut frame: F,
    ) -> anyhow::Result<()>
    where
        W: Write,
        F: FnMut(&'a Kubectl) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<(Vec<Volume>, Frame)>>,
    {
        use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
        use std::io::IsTerminal;
        let tty = output == Output::Human && std::io::stdout().is_terminal();
        let multi = MultiProgress::with_draw_target(if tty {
            ProgressDrawTarget::stdout()
        } else {
            ProgressDrawTarget::hidden()
        });
        let text = multi.add(ProgressBar::new_spinner());
        text.set_style(ProgressStyle::with_template("{msg}")?);
        let style = ProgressStyle::with_template("{prefix:40} [{bar:40}] {percent:>3}% {msg}")?
            .progress_chars("=> ");
        let mut shown: BTreeMap<String, ProgressBar> = BTreeMap::new();
        let mut merges = BTreeMap::new();
        let stop = tokio::signal::ctrl_c();
        tokio::pin!(stop);
        loop {
            let (vols, f) = frame(self).await?;
            let now = Timestamp::now();
            let body = match (&f, output) {
                (Frame::Table(v, all), Output::Human) => render::table(v, *all, now),
                (Frame::Table(v, _), Output::Json) => render::table_json(v).to_string() + "\n",
                (Frame::Describe(v, e), Output::Human) => render::describe(v, e, now),
                (Frame::Describe(v, e), Output::Json) => {
                    render::describe_json(v, e).to_string() + "\n"
                }
            };
            let bars: Vec<render::Bar> = vols
                .iter()
                .flat_map(|v| render::bars(v, &mut merges))
                .collect();
            if tty {
                text.set_message(body.trim_end().to_string());
                shown.retain(|key, bar| {
                    let keep = bars.iter().any(|b| &b.key == key);
                    if !keep {
                        bar.finish_and_clear();
                        multi.remove(bar);
                    }
                    keep
                });
                for b in &bars {
                    let bar = shown.entry(b.key.clone()).or_insert_with(|| {
                        let bar = multi.add(ProgressBar::new(b.len));
                        bar.set_style(style.clone());
                        bar.set_prefix(b.label.clone());
                        bar
                    });
                    bar.set_length(b.len);
                    bar.set_position(b.pos);
                    bar.set_message(b.text().trim_start_matches(&b.label).trim().to_string());
                }
            } else {
                out.write_all(body.as_bytes())?;
                if output == Output::Human {
                    for b in &bars {
                        writeln!(out, "{}", b.text())?;
                    }
                    writeln!(out)?;
                }
                out.flush()?;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(interval.max(1))) => {}
                _ = &mut stop => break,
            }
        }
        text.finish();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
