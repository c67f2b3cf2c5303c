"""The issue's yardstick, for bench_envoy.py in the same run: a naive Python
endpoint picker (grpc.aio, the generated ext_proc servicer) that answers a fixed
destination - no routing, no body scan, nothing but the protocol.

    python benchmarks/spikes/naive_picker/naive_picker.py PORT HOST:PORT

Same answers as the native spike (benchmarks/spikes/extproc_native): destination
header and envoy.lb metadata on the first body chunk (STREAMED +
send_body_without_waiting_for_header_response), every chunk acknowledged, echoed
in FULL_DUPLEX_STREAMED, response headers answered; on the headers when Envoy
sends no body. Envoy's access log stream (the doc's release channel) is read and
dropped.
"""

import asyncio
import sys

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2


class Naive(pb_grpc.ExternalProcessorServicer):
    def __init__(self, destination: str) -> None:
        header = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(
            key="x-gateway-destination-endpoint", raw_value=destination.encode()), append_action=2)
        metadata = struct_pb2.Struct()
        metadata.update({"envoy.lb": {"x-gateway-destination-endpoint": destination}})
        mutation = pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=[header]))
        self.on_headers = pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=mutation),
                                                dynamic_metadata=metadata)
        self.on_body = pb.ProcessingResponse(request_body=pb.BodyResponse(response=mutation), dynamic_metadata=metadata)

    async def Process(self, requests, context):  # noqa: N802
        decided, mode = False, 1
        async for message in requests:
            if message.HasField("protocol_config"):
                mode = message.protocol_config.request_body_mode
            kind = message.WhichOneof("request")
            if kind == "request_headers":
                if mode == 0 or message.request_headers.end_of_stream:  # no body: decide now
                    decided = True
                    yield self.on_headers
                elif mode == 2:  # BUFFERED: headers first, the destination on the body
                    yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
            elif kind == "request_body":
                if mode == 2:
                    decided = True
                    yield self.on_body
                    continue
                if not decided:
                    decided = True
                    yield self.on_headers
                if mode == 4:
                    yield pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
                        body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(
                            body=message.request_body.body, end_of_stream=message.request_body.end_of_stream)))))
                else:
                    yield pb.ProcessingResponse(request_body=pb.BodyResponse())
            elif kind == "response_headers":
                yield pb.ProcessingResponse(response_headers=pb.HeadersResponse())
            elif kind == "response_body":
                yield pb.ProcessingResponse(response_body=pb.BodyResponse())
            elif kind == "request_trailers":
                yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
            elif kind == "response_trailers":
                yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


class AccessLogSink(als_pb2_grpc.AccessLogServiceServicer):
    async def StreamAccessLogs(self, requests, context):  # noqa: N802
        async for _ in requests:
            pass
        return als_pb2.StreamAccessLogsResponse()


async def main(port: int, destination: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(Naive(destination), server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(AccessLogSink(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening {port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
