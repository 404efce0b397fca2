#!/usr/bin/env bash
# Regenerate the committed Python code of protos/**/*.proto.
#
#   protos/gen.sh            # writes specserve/v1/*_pb2.py, *_pb2_grpc.py, *_pb2.pyi
#   protos/gen.sh OUT_DIR    # writes OUT_DIR/specserve/v1/... instead (tests compare it)
#
# Needs grpcio-tools (pip install -e '.[dev]'). PYTHON picks the interpreter (default: python).
# protoc runs with -Iprotos, so protos/specserve/v1/x.proto becomes the module specserve.v1.x_pb2
# and generated imports between protos (from specserve.v1 import ...) resolve in the package.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root}"
python="${PYTHON:-python}"
cd "$root"
mapfile -t protos < <(find protos -name '*.proto' | LC_ALL=C sort)
if [ "${#protos[@]}" -eq 0 ]; then
  echo "no .proto files under $root/protos" >&2
  exit 1
fi
mkdir -p "$out"
"$python" -m grpc_tools.protoc -Iprotos \
  --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" "${protos[@]}"
# Every directory that received generated code is a Python package.
for p in "${protos[@]}"; do
  d="$out/$(dirname "${p#protos/}")"
  while [ "$d" != "$out" ] && [ "$d" != "$out/." ]; do
    [ -e "$d/__init__.py" ] || : > "$d/__init__.py"
    d="$(dirname "$d")"
  done
done
echo "generated ${#protos[@]} proto(s) into $out"
