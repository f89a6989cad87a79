//! The deployment files agree with the code: every setting they name exists, every port and
//! probe matches what the processes serve, every command is a real binary, and the README's
//! configuration table lists every setting. (Schemas are checked by deploy/check.)

use laabam_tests::workspace::root;
use serde_yaml::Value;
use std::collections::BTreeSet;
use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml_docs(path: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(&read(path))
        .map(|doc| {
            let mut value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}"));
            value.apply_merge().unwrap_or_else(|e| panic!("{path}: {e}"));
            value
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// `LAABAM_…` names in a text.
fn settings_in(text: &str) -> BTreeSet<String> {
    text.match_indices("LAABAM_")
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_' || c.is_ascii_digit())
                .collect::<String>()
        })
        .filter(|s| s.len() > "LAABAM_".len())
        .collect()
}

/// Every setting the code reads: `env = "LAABAM_…"` in the crates' sources.
fn code_settings() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for dir in ["shared/src", "producer/src", "dispatcher/src", "retry-scheduler/src"] {
        visit(&root().join(dir), &mut |text| {
            for (i, _) in text.match_indices("env = \"LAABAM_") {
                out.extend(settings_in(&text[i..i + 60.min(text.len() - i)]).into_iter().take(1));
            }
        });
    }
    out
}

fn visit(dir: &Path, f: &mut dyn FnMut(&str)) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            visit(&path, f);
        } else if path.extension().is_some_and(|e| e == "rs") {
            f(&std::fs::read_to_string(&path).unwrap());
        }
    }
}

const BINARIES: [&str; 3] = ["laabam-producer", "laabam-dispatcher", "laabam-retry-scheduler"];

/// The port each binary serves `/metrics` on by default, from the code.
fn metrics_port(binary: &str) -> u16 {
    let file = match binary {
        "laabam-producer" => "producer/src/api/mod.rs",
        "laabam-dispatcher" => "dispatcher/src/config.rs",
        _ => "retry-scheduler/src/config.rs",
    };
    default_port(file, "LAABAM_METRICS_ADDR")
}

/// The port of the API, which is not scraped.
fn api_port() -> u16 {
    default_port("producer/src/api/mod.rs", "LAABAM_HTTP_ADDR")
}

/// The port of the address setting `var`'s default in `file`.
fn default_port(file: &str, var: &str) -> u16 {
    let text = read(file);
    let at = text
        .find(&format!("env = \"{var}\", default_value = \"127.0.0.1:"))
        .unwrap_or_else(|| panic!("{var} default in {file}"));
    let rest = &text[at..];
    let port = rest.split("127.0.0.1:").nth(1).unwrap();
    port[..port.find('"').unwrap()].parse().unwrap()
}

#[test]
fn every_setting_named_in_deploy_and_the_readme_exists_and_every_setting_is_documented() {
    let code = code_settings();
    assert!(code.len() > 20, "found the settings: {code:?}");
    for file in [
        "deploy/compose.yaml",
        "deploy/kubernetes/config.yaml",
        "deploy/kubernetes/producer.yaml",
        "deploy/kubernetes/dispatcher.yaml",
        "deploy/kubernetes/retry-scheduler.yaml",
        "deploy/kubernetes/keda/dispatcher-scaledobject.yaml",
        "deploy/Dockerfile",
        "deploy/README.md",
        "deploy/CAPACITY.md",
        "README.md",
        "docs/performance-log.md",
    ] {
        for name in settings_in(&read(file)) {
            assert!(code.contains(&name), "{file} names {name}, which no process reads");
        }
    }
    let readme = read("README.md");
    let table = &readme[readme.find("## Configuration").unwrap()..];
    let documented = settings_in(&table[..table.find("\n## ").unwrap()]);
    for name in &code {
        assert!(
            documented.contains(name),
            "{name} is missing from the README's configuration table"
        );
    }
}

#[test]
fn compose_services_run_real_binaries_on_the_ports_prometheus_scrapes() {
    let compose = &yaml_docs("deploy/compose.yaml")[0];
    let prometheus = &yaml_docs("deploy/prometheus/prometheus.yml")[0];
    let targets: BTreeSet<String> = prometheus["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|job| {
            job["static_configs"][0]["targets"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_owned())
        })
        .collect();
    let mut scraped = BTreeSet::new();
    for (name, service) in compose["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        let Some(command) = service["command"].as_sequence() else {
            continue;
        };
        let binary = command[0].as_str().unwrap();
        if !binary.starts_with("laabam-") {
            continue;
        }
        assert!(
            BINARIES.contains(&binary),
            "{name} runs {binary}, which is not a binary of the workspace"
        );
        assert_eq!(service["image"], "laabam-webhooks", "{name}");
        let env = &service["environment"];
        let addr = env["LAABAM_METRICS_ADDR"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} sets no metrics address"));
        let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
        assert_eq!(port, metrics_port(binary), "{name} serves on the code's default port");
        assert!(addr.starts_with("0.0.0.0:"), "{name} listens beyond its container");
        if binary == "laabam-producer" {
            let api = format!("0.0.0.0:{}", api_port());
            assert_eq!(env["LAABAM_HTTP_ADDR"], api.as_str(), "{name}");
            let published = service["ports"].as_sequence().expect("the API is published");
            assert!(
                published
                    .iter()
                    .all(|p| !p.as_str().unwrap().ends_with(&format!(":{port}"))),
                "{name} publishes its metrics port to the host: {published:?}"
            );
        }
        let target = format!("{name}:{port}");
        assert!(targets.contains(&target), "Prometheus does not scrape {target}");
        scraped.insert(target);
    }
    assert_eq!(
        scraped, targets,
        "every Prometheus target is a service of the compose file"
    );
    let redis = compose["services"]["redis"]["command"].as_sequence().unwrap();
    let redis: Vec<&str> = redis.iter().map(|v| v.as_str().unwrap()).collect();
    for needed in [
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--maxmemory-policy",
        "noeviction",
    ] {
        assert!(redis.contains(&needed), "compose Redis must be durable: {redis:?}");
    }
    // What persistence costs Redis is mostly the append-only file's rewrites; at 400% growth
    // they come a quarter as often as at Redis's default (deploy/README.md, *Losing nothing*).
    let rewrite = redis.iter().position(|&flag| flag == "--auto-aof-rewrite-percentage");
    assert_eq!(
        rewrite.and_then(|i| redis.get(i + 1)),
        Some(&"400"),
        "compose Redis rewrites its append-only file at 400% growth: {redis:?}"
    );
}

#[test]
fn kubernetes_deployments_probe_and_expose_what_the_processes_serve() {
    let (ops, api) = (read("shared/src/ops.rs"), read("producer/src/api/mod.rs"));
    for path in ["/healthz", "/readyz"] {
        let route = format!(".route(\"{path}\"");
        assert!(
            ops.contains(&route) && api.contains(&route),
            "both servers route {path}"
        );
    }
    assert!(
        ops.contains(".route(\"/metrics\""),
        "the operations port serves /metrics"
    );
    assert!(!api.contains("\"/metrics\""), "the public API does not serve /metrics");
    let mut seen = BTreeSet::new();
    for file in ["producer.yaml", "dispatcher.yaml", "retry-scheduler.yaml"] {
        for doc in yaml_docs(&format!("deploy/kubernetes/{file}")) {
            if doc["kind"] == "Service" {
                for port in doc["spec"]["ports"].as_sequence().unwrap() {
                    assert_ne!(port["targetPort"], "metrics", "{file}: a Service exposes metrics");
                }
            }
            if doc["kind"] != "Deployment" {
                continue;
            }
            let pod = &doc["spec"]["template"];
            let container = &pod["spec"]["containers"][0];
            let binary = container["command"][0].as_str().unwrap();
            assert!(BINARIES.contains(&binary), "{file}: {binary}");
            seen.insert(binary.to_owned());
            let ports = container["ports"].as_sequence().unwrap();
            let port_named = |name: &str| {
                ports
                    .iter()
                    .find(|p| p["name"] == name)
                    .map(|p| p["containerPort"].as_u64().unwrap() as u16)
            };
            let port = port_named("metrics").unwrap_or_else(|| panic!("{file}: a metrics port"));
            assert_eq!(port, metrics_port(binary), "{file}: container port");
            assert_eq!(
                pod["metadata"]["annotations"]["prometheus.io/port"],
                port.to_string().as_str(),
                "{file}: scrape port"
            );
            let env_value = |var: &str| {
                let entries = container["env"].as_sequence().unwrap();
                entries
                    .iter()
                    .find(|e| e["name"] == var)
                    .map(|e| e["value"].as_str().unwrap().to_owned())
            };
            assert_eq!(
                env_value("LAABAM_METRICS_ADDR"),
                Some(format!("0.0.0.0:{port}")),
                "{file}: listen address"
            );
            if binary == "laabam-producer" {
                let api = port_named("http").unwrap_or_else(|| panic!("{file}: an API port"));
                assert_eq!(api, api_port(), "{file}: API port");
                assert_eq!(env_value("LAABAM_HTTP_ADDR"), Some(format!("0.0.0.0:{api}")), "{file}");
            }
            assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz", "{file}");
            assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz", "{file}");
            assert!(
                container["image"].as_str().unwrap().starts_with("laabam-webhooks:"),
                "{file}"
            );
            for kind in ["requests", "limits"] {
                let resources = &container["resources"][kind];
                assert!(
                    !resources["cpu"].is_null() && !resources["memory"].is_null(),
                    "{file}: {kind}"
                );
            }
            assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true, "{file}");
        }
    }
    assert_eq!(seen.len(), 3, "a Deployment per role");
    let keda = &yaml_docs("deploy/kubernetes/keda/dispatcher-scaledobject.yaml")[0];
    assert_eq!(
        keda["spec"]["triggers"][0]["metadata"]["queueName"],
        laabam_shared::topology::DISPATCH_QUEUE
    );
}

#[test]
fn the_image_builds_every_binary_and_runs_unprivileged() {
    let dockerfile = read("deploy/Dockerfile");
    assert!(
        dockerfile.lines().filter(|l| l.starts_with("FROM ")).count() >= 2,
        "multi-stage"
    );
    for binary in BINARIES {
        assert!(dockerfile.contains(&format!("--bin {binary}")), "builds {binary}");
    }
    let user = dockerfile
        .lines()
        .rev()
        .find(|l| l.starts_with("USER "))
        .expect("a USER");
    assert!(!user.contains("root") && !user.contains(" 0"), "{user}");
    for port in ["8080", "9101", "9102"] {
        assert!(
            dockerfile.lines().any(|l| l.starts_with("EXPOSE") && l.contains(port)),
            "exposes {port}"
        );
    }
    let toolchain = dockerfile.lines().find(|l| l.starts_with("FROM rust:")).unwrap();
    let version: Vec<u32> = toolchain["FROM rust:".len()..]
        .split('-')
        .next()
        .unwrap()
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    let wanted = read("Cargo.toml");
    let wanted = wanted.split("rust-version = \"").nth(1).unwrap();
    let wanted: Vec<u32> = wanted[..wanted.find('"').unwrap()]
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        version >= wanted,
        "the build image's Rust {version:?} is at least rust-version {wanted:?}"
    );
}
