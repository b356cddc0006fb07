#!/usr/bin/env bash
# Smoke test of the lab, from the host: a ClusterIP (from a worker node, the host has no route
# to Service IPs), a NodePort and an Ingress (both straight from the host). Run after
# `vagrant up` in this directory. Exit 0 when all three answer, 1 otherwise.
set -euo pipefail

cd "$(dirname "$0")"

CONTROL_PLANE=${CONTROL_PLANE:-kproxy-cp}
WORKER=${WORKER:-kproxy-worker}
WORKER_IP=${WORKER_IP:-192.168.56.11}
EDGE_IP=${EDGE_IP:-192.168.56.12}
NODEPORT=30080
HOST=echo.kproxy.test
TRIES=${TRIES:-60}

kubectl_cp() {
  vagrant ssh "${CONTROL_PLANE}" -c "sudo kubectl $*" -- -q
}

# retry DESCRIPTION COMMAND...: run COMMAND until it succeeds, TRIES times, 5 s apart.
retry() {
  local what=$1
  shift
  local i
  for ((i = 1; i <= TRIES; i++)); do
    if "$@"; then
      echo "ok: ${what}"
      return 0
    fi
    sleep 5
  done
  echo "FAILED: ${what}" >&2
  return 1
}

vagrant ssh "${CONTROL_PLANE}" -c "sudo kubectl apply -f /kproxy/vagrant/smoke-app.yaml" -- -q
kubectl_cp -n kproxy-smoke rollout status deployment/echo --timeout=300s
kubectl_cp -n kube-system rollout status daemonset/kproxy --timeout=300s
kubectl_cp -n kproxy-ingress rollout status daemonset/kproxy-ingress --timeout=300s

cluster_ip=$(kubectl_cp -n kproxy-smoke get service echo -o 'jsonpath={.spec.clusterIP}' | tr -d '\r')
echo "echo ClusterIP: ${cluster_ip}"

# shellcheck disable=SC2317  # called through retry
check_cluster_ip() {
  vagrant ssh "${WORKER}" -c "curl -fsS --max-time 3 http://${cluster_ip}/hostname" -- -q | grep -q '^echo-'
}

# shellcheck disable=SC2317  # called through retry
check_node_port() {
  curl -fsS --max-time 3 "http://${WORKER_IP}:${NODEPORT}/hostname" | grep -q '^echo-'
}

# shellcheck disable=SC2317  # called through retry
check_ingress() {
  curl -fsS --max-time 3 --resolve "${HOST}:80:${EDGE_IP}" "http://${HOST}/hostname" | grep -q '^echo-'
}

failed=0
retry "ClusterIP ${cluster_ip}:80 from ${WORKER}" check_cluster_ip || failed=1
retry "NodePort ${WORKER_IP}:${NODEPORT} from the host" check_node_port || failed=1
retry "Ingress http://${HOST}/ via ${EDGE_IP} from the host" check_ingress || failed=1
exit "${failed}"
