//! The names an injection uses: annotations, containers, volumes, paths.

pub const DEFAULT_IMAGE: &str = concat!("ambassador:", env!("CARGO_PKG_VERSION"));
pub const DEFAULT_CONFIG_MAP: &str = "ambassador";

pub const ANN_INJECT: &str = "ambassador.io/inject";
pub const ANN_INJECTED: &str = "ambassador.io/injected";
pub const ANN_EXCLUDE_PORTS: &str = "ambassador.io/exclude-outbound-ports";
pub const ANN_EXCLUDE_CIDRS: &str = "ambassador.io/exclude-outbound-cidrs";
pub const ANN_INBOUND_PORTS: &str = "ambassador.io/inbound-ports";
pub const ANN_EXCLUDE_INBOUND_PORTS: &str = "ambassador.io/exclude-inbound-ports";
pub const ANN_CONFIG: &str = "ambassador.io/config";
pub const ANN_SECRETS: &str = "ambassador.io/secrets";

/// The container runtime's default AppArmor profile denies writes under
/// /sys/fs/ except the cgroupfs, so `init` could not pin in the bpffs: the
/// init container runs unconfined (the annotation, which Kubernetes 1.29
/// knows; 1.30+ also has `securityContext.appArmorProfile`).
pub const ANN_APPARMOR_INIT: &str =
    "container.apparmor.security.beta.kubernetes.io/ambassador-init";
/// The usual scrape annotations' names; they name the proxy's metrics
/// listener only where the Pod has none of its own.
pub const ANN_SCRAPE: [&str; 3] = [
    "prometheus.io/scrape",
    "prometheus.io/port",
    "prometheus.io/path",
];
/// The proxy's metrics listener (`proxy.metrics`' default for `proxy`).
pub const METRICS_PORT: u16 = crate::config::DEFAULT_METRICS.port();
pub const METRICS_PORT_NAME: &str = "amb-metrics";
/// The proxy's uid (`proxy.uid`' default): its sockets are never redirected,
/// so an app running as this uid would bypass the proxy.
pub const PROXY_UID: u32 = ambassador_common::DEFAULT_PROXY_UID;

/// The scrape annotations' values for the proxy's metrics listener.
pub fn scrape_values() -> [String; 3] {
    ["true".into(), METRICS_PORT.to_string(), "/metrics".into()]
}

pub const INIT_CONTAINER: &str = "ambassador-init";
pub const PROXY_CONTAINER: &str = "ambassador-proxy";
pub const VOL_CONFIG: &str = "ambassador-config";
pub const VOL_BPFFS: &str = "ambassador-bpffs";
/// Both containers get the Pod's UID: init finds the Pod's cgroup and names
/// the shared maps by it; the proxy's mount of those maps is named by it.
pub const POD_UID_ENV: &str = "env:
  - name: AMBASSADOR_POD_UID
    valueFrom:
      fieldRef:
        fieldPath: metadata.uid";
/// Where the sidecar sees its Pod's shared maps (`proxy --kernel-maps`).
pub const KERNEL_MAPS_DIR: &str = "/var/run/ambassador/kernel";
pub const VOL_CGROUP: &str = "ambassador-cgroup";
/// The sidecar's own directory for its admin socket (`proxy.admin_socket`).
pub const VOL_ADMIN: &str = "ambassador-admin";
pub const ADMIN_DIR: &str = "/var/run/ambassador/admin";
pub const VOL_SECRET: &str = "ambassador-secret-";

/// Where the image has the binary (deploy/Dockerfile), for exec probes.
pub const BINARY: &str = "/usr/local/bin/ambassador";
pub const CONFIG_DIR: &str = "/etc/ambassador";
pub const SECRETS_DIR: &str = "/var/run/secrets/ambassador";
/// Where the init container sees the node's cgroupfs.
pub const HOST_CGROUP_DIR: &str = "/host/sys/fs/cgroup";
