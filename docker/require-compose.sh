#!/bin/sh
# Fail in one line unless `docker compose` is at least the version docker/compose.yaml needs.
#
# Usage:  docker/require-compose.sh && docker compose -f docker/compose.yaml up -d
#
# Compose files have no field that checks the tool's version, and an older Compose
# rejects this one with a schema error that does not name the version it needs.
set -eu

MIN="2.20.0"  # top-level `name`, `depends_on.<service>.required`

if ! version="$(docker compose version --short 2>/dev/null)"; then
    echo "docker/compose.yaml needs Docker Compose >= $MIN (the \`docker compose\` plugin); none found" >&2
    exit 1
fi
version="${version#v}"
lowest="$(printf '%s\n%s\n' "$MIN" "$version" | sort -V | head -n 1)"
if [ "$lowest" != "$MIN" ]; then
    echo "docker/compose.yaml needs Docker Compose >= $MIN; this is $version: upgrade docker-compose-plugin" >&2
    exit 1
fi
echo "Docker Compose $version (>= $MIN)"
