#!/usr/bin/env bash
# On the control plane: kproxy first (nothing else can reach the `kubernetes` ClusterIP before
# it runs), then the pod network, then the edge label for the nodes still to join.
# Usage: deploy.sh REPO_DIR API_SERVER_IP EDGE_NODES (comma-separated) [iptables|ipvs|nftables]
set -euo pipefail

repo=$1
api_server=$2
edge_nodes=$3
mode=${4:-iptables}
case ${mode} in
  iptables) overlay=ingress ;;
  ipvs) overlay=ingress-ipvs ;;
  nftables) overlay=ingress-nftables ;;
  *) echo "deploy.sh: mode must be iptables, ipvs or nftables, not ${mode}" >&2; exit 2 ;;
esac
export KUBECONFIG=/etc/kubernetes/admin.conf

# 1. kproxy reaches the API server by its address, not by the ClusterIP it is about to program.
for ns in kube-system kproxy-ingress; do
  kubectl create namespace "${ns}" --dry-run=client -o yaml | kubectl apply -f -
  kubectl -n "${ns}" create configmap kproxy-apiserver \
    --from-literal=host="${api_server}" --from-literal=port=6443 --dry-run=client -o yaml |
    kubectl apply -f -
done
kubectl apply -k "${repo}/daemonset/overlays/${overlay}"
kubectl -n kube-system rollout status daemonset/kproxy --timeout=300s

# 2. The pod network (flannel, on the private network's interface; 10.244.0.0/16 as in
#    daemonset/base/configmap.yaml).
curl -fsSL https://github.com/flannel-io/flannel/releases/latest/download/kube-flannel.yml |
  sed 's|- --kube-subnet-mgr|- --kube-subnet-mgr\n        - --iface-regex=^192\\.168\\.56\\.|' |
  kubectl apply -f -

# 3. Workers join after this script: label the edge nodes when they appear (node-role labels
#    cannot be set by the kubelet itself).
IFS=, read -r -a edges <<<"${edge_nodes}"
for edge in "${edges[@]}"; do
  systemctl stop "kproxy-label-${edge}" 2>/dev/null || true
  systemctl reset-failed "kproxy-label-${edge}" 2>/dev/null || true
  systemd-run --unit "kproxy-label-${edge}" --setenv KUBECONFIG="${KUBECONFIG}" \
    /bin/sh -c "for i in \$(seq 360); do kubectl label node '${edge}' node-role.kubernetes.io/edge= --overwrite && exit 0; sleep 5; done; exit 1"
done
