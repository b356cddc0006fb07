#!/usr/bin/env bash
# Build kproxy's two images from the repository's Dockerfile with buildah (no Docker engine in
# the lab) and load them into containerd's k8s.io namespace under the names daemonset/ uses
# (kproxy:0.1.0 is docker.io/library/kproxy:0.1.0 to the kubelet; imagePullPolicy IfNotPresent).
# Usage: build-images.sh REPO_DIR
set -euo pipefail

repo=$1
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "${repo}/pyproject.toml")
for target in kproxy ingress; do
  name=kproxy
  [[ ${target} == ingress ]] && name=kproxy-ingress
  ref="docker.io/library/${name}:${version}"
  archive="/var/tmp/${name}.tar"
  buildah --quiet bud --layers --target "${target}" --tag "${ref}" "${repo}" >/dev/null
  rm -f "${archive}"
  buildah push --quiet "${ref}" "docker-archive:${archive}:${ref}"
  ctr --namespace k8s.io images import "${archive}" >/dev/null
  rm -f "${archive}"
  echo "image ${ref} loaded"
done
