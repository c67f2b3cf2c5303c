#!/usr/bin/env bash
# Build the native ext_proc spike against Debian's gRPC C++ (not part of the
# package, not run by CI):
#   apt-get install -y libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
#   bash benchmarks/spikes/extproc_native/build.sh /tmp/picker_native [picker_native|picker_callback]
#   GEOSERVE_ENVOY=... python benchmarks/bench_envoy.py --quick \
#       --picker-command "/tmp/picker_native {port} {destination}"
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/picker_native}"
source="${2:-picker_native}"  # picker_callback: the same answers on gRPC's callback API
work="$(mktemp -d)"
protoc -I"$here" -I/usr/include --cpp_out="$work" --grpc_out="$work" \
    --plugin=protoc-gen-grpc="$(command -v grpc_cpp_plugin)" "$here/ext_proc_min.proto" "$here/als_min.proto"
g++ -O2 -std=c++17 -I"$work" -I"$here" -o "$out" "$here/$source.cc" "$work/ext_proc_min.pb.cc" \
    "$work/ext_proc_min.grpc.pb.cc" "$work/als_min.pb.cc" "$work/als_min.grpc.pb.cc" $(pkg-config --cflags --libs grpc++ protobuf)
rm -rf "$work"
echo "built $out"
