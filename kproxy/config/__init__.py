"""kproxy's configuration: one frozen value, with kube-proxy's names and defaults.

`ProxyConfig` is what every mode reads. `RunConfig` adds what the `kproxy run` daemon needs, and
`load_run_config` builds it from kube-proxy's flags and a KubeProxyConfiguration file, for
`kproxy run`, `kproxy sync` and `kproxy trace` alike. One job a module: the values (`values`),
kube-proxy's syntax (`syntax`), the field and flag table (`table`), the file (`file`), the
resolution of all of them (`loader`); this package re-exports their public names.
"""

from kproxy.config.file import dump_config
from kproxy.config.loader import load_run_config
from kproxy.config.syntax import format_duration, join_host_port, parse_duration, split_host_port
from kproxy.config.table import (
    API_VERSION,
    DEFAULT_OOM_SCORE_ADJ,
    FIELDS,
    FLAGS,
    FLAGS_BY_NAME,
    HEALTHZ_PORT,
    KIND,
    KINDS,
    METRICS_PORT,
    MODE_FIELDS,
    RUN_ONLY_FIELDS,
    RUN_ONLY_FLAGS,
    Field,
    Flag,
    acted_on,
    run_only,
)
from kproxy.config.values import (
    DEFAULT_SCHEDULER,
    IPVS_FLAGS,
    MODES,
    RUN_MODES,
    SCHEDULERS,
    ConntrackConfig,
    IpvsConfig,
    LoadedConfig,
    ProxyConfig,
    RunConfig,
    parse_cidr_list,
    parse_nodeport_addresses,
    validate,
    validate_ipvs_config,
)

__all__ = [
    "API_VERSION",
    "ConntrackConfig",
    "DEFAULT_OOM_SCORE_ADJ",
    "DEFAULT_SCHEDULER",
    "FIELDS",
    "FLAGS",
    "FLAGS_BY_NAME",
    "Field",
    "Flag",
    "HEALTHZ_PORT",
    "IPVS_FLAGS",
    "IpvsConfig",
    "KIND",
    "KINDS",
    "LoadedConfig",
    "METRICS_PORT",
    "MODES",
    "MODE_FIELDS",
    "ProxyConfig",
    "RUN_MODES",
    "RUN_ONLY_FIELDS",
    "RUN_ONLY_FLAGS",
    "RunConfig",
    "SCHEDULERS",
    "acted_on",
    "dump_config",
    "format_duration",
    "join_host_port",
    "load_run_config",
    "parse_cidr_list",
    "parse_duration",
    "parse_nodeport_addresses",
    "run_only",
    "split_host_port",
    "validate",
    "validate_ipvs_config",
]
