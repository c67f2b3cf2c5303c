"""A fixed-answer picker on geoserve's native transport, for bench_envoy.py in the
same run: the gRPC C++ server of ``geoserve._core.extproc`` handing each message
to a Python handler that answers a fixed destination - no reading, no routing.

    python benchmarks/spikes/native_fixed/native_fixed.py PORT HOST:PORT [--spin-us N]

What it separates: against the C++ fixed answer (``extproc_native``) it is the
cost of the transport's Python boundary (the GIL and a call per message); against
``geoserve envoy-picker --transport native`` it is the cost of the picker's own
work. ``--spin-us N`` busy-waits N microseconds in every call, to see how time
spent in Python per message turns into added latency. Same answers as the other
spikes for the doc's config (STREAMED with the body sent early): the destination
on the first body chunk, the rest of the chunks and the response acknowledged by
the transport's standing answers, the response headers still handed over after
their answer (as the picker's release is).
"""

import argparse
import signal
import threading
import time

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from geoserve._core.extproc import NativeServer

REQUEST_HEADERS, RESPONSE_HEADERS, REQUEST_BODY, RESPONSE_BODY = (field << 3 | 2 for field in (2, 3, 4, 5))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("destination")
    parser.add_argument("--spin-us", type=float, default=0.0)
    args = parser.parse_args()
    header = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(
        key="x-gateway-destination-endpoint", raw_value=args.destination.encode()), append_action=2)
    metadata = struct_pb2.Struct()
    metadata.update({"envoy.lb": {"x-gateway-destination-endpoint": args.destination}})
    route = pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=pb.CommonResponse(
        header_mutation=pb.HeaderMutation(set_headers=[header]))), dynamic_metadata=metadata).SerializeToString()
    body_ack = pb.ProcessingResponse(request_body=pb.BodyResponse()).SerializeToString()
    response_ack = pb.ProcessingResponse(response_headers=pb.HeadersResponse()).SerializeToString()
    response_body_ack = pb.ProcessingResponse(response_body=pb.BodyResponse()).SerializeToString()
    standing = ((REQUEST_BODY, body_ack, False), (RESPONSE_HEADERS, response_ack, True),
                (RESPONSE_BODY, response_body_ack, True))
    spin = args.spin_us * 1e-6

    def stream():
        decided = False

        def handle(data):
            nonlocal decided
            if data is None:
                return None
            if spin:
                until = time.perf_counter() + spin
                while time.perf_counter() < until:
                    pass
            if data[0] == REQUEST_HEADERS:
                return [], False  # held until the body
            if data[0] == REQUEST_BODY and not decided:
                decided = True
                return [route, body_ack], False, standing
            return [body_ack if data[0] == REQUEST_BODY else response_ack if data[0] == RESPONSE_HEADERS
                    else response_body_ack], False

        return handle

    def access_log():  # Envoy's access log stream (the doc's release channel): read, not looked at
        return lambda data: None if data is None else ([], False)

    server = NativeServer(stream, {"/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs": access_log})
    server.start("127.0.0.1", args.port)
    server.set_serving("", True)
    print(f"listening {args.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0.2)


if __name__ == "__main__":
    main()
