// Envoy's gRPC access log stream (the doc's release channel when the response is
// not sent to the picker) for the fixed-answer spikes: read and dropped.
#pragma once
#include <grpcpp/grpcpp.h>
#include "als_min.grpc.pb.h"

class AccessLogSink final : public envoy::service::accesslog::v3::AccessLogService::Service {
  grpc::Status StreamAccessLogs(grpc::ServerContext*,
                                grpc::ServerReader<envoy::service::accesslog::v3::StreamAccessLogsMessage>* reader,
                                envoy::service::accesslog::v3::StreamAccessLogsResponse*) override {
    envoy::service::accesslog::v3::StreamAccessLogsMessage message;
    while (reader->Read(&message)) {
    }
    return grpc::Status::OK;
  }
};
