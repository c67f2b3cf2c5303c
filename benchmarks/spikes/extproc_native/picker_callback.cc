// Spike: picker_native.cc on gRPC's callback API (a ServerBidiReactor per stream)
// instead of the sync server (a thread per stream): messages are answered on
// gRPC's own threads, without handing each one to the stream's thread and back.
// Same answers as picker_native.cc for the doc's config (STREAMED with the body
// sent early) and the --floor listeners (no body); other body modes are not
// served. Does the protocol's floor move when the server stops handing off?
#include <deque>
#include <iostream>
#include <mutex>
#include <string>
#include <grpcpp/grpcpp.h>
#include "access_log_sink.h"
#include "ext_proc_min.grpc.pb.h"

using namespace envoy::service::ext_proc::v3;

class Stream final : public grpc::ServerBidiReactor<ProcessingRequest, ProcessingResponse> {
 public:
  Stream(const ProcessingResponse* decision) : decision_(decision) { StartRead(&in_); }

  void OnReadDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mu_);
    if (!ok) {  // Envoy closed its side: finish once every answer is written
      reading_done_ = true;
      if (!writing_) Finish(grpc::Status::OK);
      return;
    }
    if (in_.has_protocol_config()) no_body_ = in_.protocol_config().request_body_mode() == 0;
    ProcessingResponse r;
    switch (in_.request_case()) {
      case ProcessingRequest::kRequestHeaders:
        if (in_.request_headers().end_of_stream() || no_body_) { Queue(*decision_); decided_ = true; }
        break;
      case ProcessingRequest::kRequestBody:
        if (!decided_) { Queue(*decision_); decided_ = true; }
        r.mutable_request_body();
        Queue(r);
        break;
      case ProcessingRequest::kResponseHeaders: r.mutable_response_headers(); Queue(r); break;
      case ProcessingRequest::kResponseBody: r.mutable_response_body(); Queue(r); break;
      case ProcessingRequest::kRequestTrailers: r.mutable_request_trailers(); Queue(r); break;
      case ProcessingRequest::kResponseTrailers: r.mutable_response_trailers(); Queue(r); break;
      default: break;
    }
    StartRead(&in_);
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mu_);
    out_.pop_front();
    if (ok && !out_.empty()) { StartWrite(&out_.front()); return; }
    writing_ = false;
    if (reading_done_ || !ok) Finish(grpc::Status::OK);
  }

  void OnDone() override { delete this; }

 private:
  void Queue(const ProcessingResponse& r) {  // under mu_
    out_.push_back(r);
    if (!writing_) { writing_ = true; StartWrite(&out_.front()); }
  }
  const ProcessingResponse* decision_;
  ProcessingRequest in_;
  std::deque<ProcessingResponse> out_;
  std::mutex mu_;
  bool writing_ = false, reading_done_ = false, decided_ = false, no_body_ = false;
};

class Picker final : public ExternalProcessor::CallbackService {
 public:
  explicit Picker(const std::string& dest) {
    auto* common = decision_.mutable_request_headers()->mutable_response();
    auto* h = common->mutable_header_mutation()->add_set_headers();
    h->mutable_header()->set_key("x-gateway-destination-endpoint");
    h->mutable_header()->set_raw_value(dest);
    h->set_append_action(2);  // OVERWRITE_IF_EXISTS_OR_ADD
    auto& lb = (*decision_.mutable_dynamic_metadata()->mutable_fields())["envoy.lb"];
    (*lb.mutable_struct_value()->mutable_fields())["x-gateway-destination-endpoint"].set_string_value(dest);
  }
  grpc::ServerBidiReactor<ProcessingRequest, ProcessingResponse>* Process(grpc::CallbackServerContext*) override {
    return new Stream(&decision_);
  }

 private:
  ProcessingResponse decision_;
};

int main(int argc, char** argv) {
  if (argc < 3) { std::cerr << "usage: picker_callback PORT DEST\n"; return 2; }
  Picker service(argv[2]);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(std::string("127.0.0.1:") + argv[1], grpc::InsecureServerCredentials());
  builder.RegisterService(&service);
  AccessLogSink sink;  // a sync service beside the callback one
  builder.RegisterService(&sink);
  auto server = builder.BuildAndStart();
  std::cout << "listening " << argv[1] << std::endl;
  server->Wait();
}
