// Spike: a fixed-answer ext_proc endpoint picker in C++ (grpc++ sync server), the
// same protocol as the Python spikes of docs/integrations/envoy.md: answer the
// request headers with the destination header and envoy.lb metadata once the first
// body chunk arrives (STREAMED + send_body_without_waiting_for_header_response),
// acknowledge every body chunk, answer the response headers; when Envoy sends no body
// (request_body_mode NONE: bench_envoy.py --floor) it answers on the headers, one
// exchange per request. No routing: it measures what the transport costs, to decide
// whether a native server meets 0.5 ms.
#include <cstdlib>
#include <iostream>
#include <string>
#include <grpcpp/grpcpp.h>
#include "access_log_sink.h"
#include "ext_proc_min.grpc.pb.h"

using namespace envoy::service::ext_proc::v3;

class Picker final : public ExternalProcessor::Service {
 public:
  explicit Picker(std::string dest) : dest_(std::move(dest)) {}
  grpc::Status Process(grpc::ServerContext*, grpc::ServerReaderWriter<ProcessingResponse, ProcessingRequest>* stream) override {
    ProcessingRequest req;
    bool decided = false, duplex = false, buffered = false, no_body = false;
    while (stream->Read(&req)) {
      if (req.has_protocol_config()) {
        duplex = req.protocol_config().request_body_mode() == 4;    // FULL_DUPLEX_STREAMED
        buffered = req.protocol_config().request_body_mode() == 2;  // BUFFERED: headers first, then the body
        no_body = req.protocol_config().request_body_mode() == 0;   // NONE: the floor, one exchange per request
      }
      ProcessingResponse r;
      switch (req.request_case()) {
        case ProcessingRequest::kRequestHeaders:
          if (req.request_headers().end_of_stream() || no_body) { stream->Write(Decision(false)); decided = true; }
          else if (buffered) { r.mutable_request_headers(); stream->Write(r); }
          break;
        case ProcessingRequest::kRequestBody:
          if (buffered) { stream->Write(Decision(true)); decided = true; break; }  // the destination rides on the body answer
          if (!decided) { stream->Write(Decision(false)); decided = true; }
          if (duplex) {  // the GIE's mode: every chunk is echoed back
            auto* echo = r.mutable_request_body()->mutable_response()->mutable_body_mutation()->mutable_streamed_response();
            echo->set_body(req.request_body().body());
            echo->set_end_of_stream(req.request_body().end_of_stream());
          } else {
            r.mutable_request_body();
          }
          stream->Write(r);
          break;
        case ProcessingRequest::kResponseHeaders: r.mutable_response_headers(); stream->Write(r); break;
        case ProcessingRequest::kResponseBody: r.mutable_response_body(); stream->Write(r); break;
        case ProcessingRequest::kRequestTrailers: r.mutable_request_trailers(); stream->Write(r); break;
        case ProcessingRequest::kResponseTrailers: r.mutable_response_trailers(); stream->Write(r); break;
        default: break;
      }
    }
    return grpc::Status::OK;
  }

 private:
  ProcessingResponse Decision(bool on_body) const {
    ProcessingResponse r;
    auto* common = on_body ? r.mutable_request_body()->mutable_response() : r.mutable_request_headers()->mutable_response();
    auto* h = common->mutable_header_mutation()->add_set_headers();
    h->mutable_header()->set_key("x-gateway-destination-endpoint");
    h->mutable_header()->set_raw_value(dest_);
    h->set_append_action(2);  // OVERWRITE_IF_EXISTS_OR_ADD
    auto& lb = (*r.mutable_dynamic_metadata()->mutable_fields())["envoy.lb"];
    (*lb.mutable_struct_value()->mutable_fields())["x-gateway-destination-endpoint"].set_string_value(dest_);
    return r;
  }
  std::string dest_;
};

int main(int argc, char** argv) {
  if (argc < 3) { std::cerr << "usage: picker_native PORT DEST\n"; return 2; }
  Picker service(argv[2]);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(std::string("127.0.0.1:") + argv[1], grpc::InsecureServerCredentials());
  builder.RegisterService(&service);
  AccessLogSink sink;
  builder.RegisterService(&sink);
  auto server = builder.BuildAndStart();
  std::cout << "listening " << argv[1] << std::endl;
  server->Wait();
}
