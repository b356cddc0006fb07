# syntax=docker/dockerfile:1
# kproxy's images, for daemonset/ (see docs/deploy.md):
#   docker build --target kproxy  -t kproxy:0.1.0 .          # kproxy run, sync, trace, cleanup, hostports
#   docker build --target ingress -t kproxy-ingress:0.1.0 .  # the same + nginx-light, for `kproxy ingress controller`
# Debian bookworm-slim with Debian's python3 (3.11, what pyproject's requires-python asks) and a
# venv holding kproxy and its pure-Python dependencies; no compiler reaches the final images.
# tests/deploy/test_deploy.py checks that every binary kproxy's backends run is installed here.

ARG DEBIAN=docker.io/library/debian:bookworm-slim

# -- build: the venv ---------------------------------------------------------------------------
FROM ${DEBIAN} AS build
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kproxy ./kproxy
RUN python3 -m venv /opt/kproxy \
 && /opt/kproxy/bin/pip install --no-cache-dir --no-compile . \
 && /opt/kproxy/bin/python -m compileall -q /opt/kproxy/lib \
 && /opt/kproxy/bin/pip uninstall -y pip \
 && /opt/kproxy/bin/kproxy version

# -- kproxy: the node proxy --------------------------------------------------------------------
FROM ${DEBIAN} AS kproxy
ARG DEBIAN_FRONTEND=noninteractive
# What kproxy runs, and what an operator needs to look at it with `kubectl exec`:
#   iptables   iptables-{nft,legacy}{,-save,-restore} and ip6tables-* (both backends; kproxy picks
#              the node's, never the alternatives symlink); also provides libxtables (python-iptables)
#   ipset      IPVS mode: ipset save / restore
#   conntrack  conntrack -L / -D: stale UDP flows after endpoint changes
#   kmod       modprobe ip_vs (IPVS mode)
#   nftables   nft -f - (the nftables mode); nft list ruleset (debugging)
#   ipvsadm    ipvsadm -Ln (debugging the IPVS mode; kproxy itself speaks netlink)
#   iproute2   ip addr / route / link (debugging; kproxy itself speaks netlink)
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 iptables nftables ipset conntrack kmod ipvsadm iproute2 \
 && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /usr/share/doc/* /usr/share/man/*
COPY --from=build /opt/kproxy /opt/kproxy
ENV PATH=/opt/kproxy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Root: the DaemonSet runs it privileged in the host's network namespace (docs/deploy.md).
USER 0
ENTRYPOINT []
CMD ["kproxy", "--help"]

# -- ingress: the Ingress controller (kproxy + nginx) ------------------------------------------
FROM kproxy AS ingress
ARG DEBIAN_FRONTEND=noninteractive
# nginx-light: the nginx kproxy renders for (tests/ingress run the same package). Debian's
# postinst starts nothing in a build (no init); the controller runs nginx as its child.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx-light \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
 && rm -f /etc/nginx/sites-enabled/default
CMD ["kproxy", "ingress", "controller", "--help"]
