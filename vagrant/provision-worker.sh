#!/usr/bin/env bash
# A worker joins the control plane (lab only: a fixed token and no CA pinning).
# Usage: provision-worker.sh CONTROL_PLANE_IP TOKEN
set -euo pipefail

control_plane=$1
token=$2

if [[ ! -f /etc/kubernetes/kubelet.conf ]]; then
  for _ in $(seq 60); do
    if curl -ksf "https://${control_plane}:6443/readyz" >/dev/null; then
      break
    fi
    sleep 5
  done
  kubeadm join "${control_plane}:6443" --token "${token}" --discovery-token-unsafe-skip-ca-verification
fi
