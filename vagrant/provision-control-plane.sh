#!/usr/bin/env bash
# The control plane: kubeadm init without kube-proxy's addon (kproxy replaces it).
# Usage: provision-control-plane.sh NODE_IP POD_CIDR TOKEN
set -euo pipefail

node_ip=$1
pod_cidr=$2
token=$3

if [[ ! -f /etc/kubernetes/admin.conf ]]; then
  kubeadm init \
    --apiserver-advertise-address "${node_ip}" \
    --control-plane-endpoint "${node_ip}:6443" \
    --pod-network-cidr "${pod_cidr}" \
    --token "${token}" --token-ttl 0 \
    --skip-phases=addon/kube-proxy
fi
install -d -m 0700 /root/.kube
install -m 0600 /etc/kubernetes/admin.conf /root/.kube/config
install -d -m 0700 -o vagrant -g vagrant /home/vagrant/.kube
install -m 0600 -o vagrant -g vagrant /etc/kubernetes/admin.conf /home/vagrant/.kube/config
