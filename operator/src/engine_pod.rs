//! Engine pod settings from the chart (`engine.*` values, passed as JSON in `--engine-pod` /
//! `TANDEM_ENGINE_POD`): pull secrets, tolerations, node selector, resources, annotations and the
//! engine's log format. Applied on top of what plan.rs builds.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{LocalObjectReference, Pod, ResourceRequirements, Toleration};
use serde::Deserialize;

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct EnginePodSettings {
    pub image_pull_secrets: Vec<LocalObjectReference>,
    pub tolerations: Vec<Toleration>,
    pub node_selector: BTreeMap<String, String>,
    /// None or empty: plan.rs's requests stay.
    pub resources: Option<ResourceRequirements>,
    pub annotations: BTreeMap<String, String>,
    /// The engine's `--log-format`; None means `json`.
    pub log_format: Option<String>,
}

impl EnginePodSettings {
    /// Parses the JSON the chart renders; a clear error for anything else.
    pub fn parse(json: &str) -> Result<Self, String> {
        let s: Self =
            serde_json::from_str(json).map_err(|e| format!("engine pod settings: {e}"))?;
        match s.log_format.as_deref() {
            None | Some("json") | Some("text") => Ok(s),
            Some(other) => Err(format!(
                "engine pod settings: logFormat {other:?} is neither json nor text"
            )),
        }
    }

    pub fn log_format(&self) -> &str {
        self.log_format.as_deref().unwrap_or("json")
    }

    /// Adds the settings to an engine (or wipe) pod; the operator's own annotations win a clash.
    pub fn apply(&self, pod: &mut Pod) {
        if !self.annotations.is_empty() {
            let ann = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
            for (k, v) in &self.annotations {
                ann.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        let Some(spec) = pod.spec.as_mut() else {
            return;
        };
        if !self.image_pull_secrets.is_empty() {
            spec.image_pull_secrets = Some(self.image_pull_secrets.clone());
        }
        if !self.tolerations.is_empty() {
            spec.tolerations = Some(self.tolerations.clone());
        }
        if !self.node_selector.is_empty() {
            spec.node_selector = Some(self.node_selector.clone());
        }
        let resources = self
            .resources
            .as_ref()
            .filter(|r| r.requests.is_some() || r.limits.is_some());
        if let Some(r) = resources {
            for c in &mut spec.containers {
                c.resources = Some(r.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_charts_json_lands_on_the_pod_and_bad_input_is_refused() {
        let s = EnginePodSettings::parse(
            r#"{"imagePullSecrets":[{"name":"regcred"}],"tolerations":[{"key":"storage","operator":"Exists","effect":"NoSchedule"}],
                "nodeSelector":{"tandem.dev/storage":"true"},"resources":{"limits":{"memory":"1Gi"}},
                "annotations":{"example.com/team":"storage"},"logFormat":"json"}"#,
        )
        .unwrap();
        let mut pod = Pod {
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                containers: vec![Default::default()],
                ..Default::default()
            }),
            ..Default::default()
        };
        s.apply(&mut pod);
        let spec = pod.spec.unwrap();
        assert_eq!(spec.image_pull_secrets.unwrap()[0].name, "regcred");
        assert_eq!(spec.tolerations.unwrap()[0].key.as_deref(), Some("storage"));
        assert_eq!(spec.node_selector.unwrap()["tandem.dev/storage"], "true");
        let limits = spec.containers[0]
            .resources
            .clone()
            .unwrap()
            .limits
            .unwrap();
        assert_eq!(limits["memory"].0, "1Gi");
        assert_eq!(
            pod.metadata.annotations.unwrap()["example.com/team"],
            "storage"
        );
        // Empty values change nothing; unknown keys and formats are refused.
        let empty = EnginePodSettings::parse(r#"{"resources":{},"tolerations":[]}"#).unwrap();
        assert_eq!(empty.log_format(), "json");
        assert!(EnginePodSettings::parse(r#"{"tolerations":[],"nodeselector":{}}"#).is_err());
        assert!(EnginePodSettings::parse(r#"{"logFormat":"xml"}"#).is_err());
        assert!(EnginePodSettings::parse("not json").is_err());
    }
}
