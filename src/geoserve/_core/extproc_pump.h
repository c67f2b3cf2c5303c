// The native transport of the Envoy endpoint picker: a gRPC C++ server (sync API)
// that serves streaming methods as raw bytes - ext_proc's
// /envoy.service.ext_proc.v3.ExternalProcessor/Process, and the gRPC access log
// service Envoy reports finished requests on - and the standard gRPC health
// service. It knows nothing of their messages: per stream it asks the method's
// Python factory for a handler, hands it every message as bytes (with the GIL,
// taken only around that call) and writes back the bytes it answers (an access log
// stream's handler answers nothing). All of the picker's logic stays in
// geoserve.integrations.envoy, shared with the pure-Python (grpc.aio) transport;
// this file only moves bytes.
//
// The handler contract: handler(bytes) -> (list[bytes], bool done[, standing]): the
// answers in order, whether the stream ends after them (an immediate response),
// and optionally standing answers: a tuple of (first byte, answer bytes, notify),
// each replacing an earlier one for that byte. From then on a message that starts
// with that byte (its first field's tag: in ext_proc, which part of the HTTP
// exchange it carries) is answered with those bytes at once, without the GIL; with
// notify the handler gets the message after the answer has gone (and its answers
// to it are dropped: they must be the standing answer), else not at all. The
// picker uses it for what does not depend on a message's content once it has
// decided: acknowledging body chunks, and answering the response headers (the
// version stamp) while it releases its router state off Envoy's critical path.
// The factory is called with the stream's first message (a stream that ends before
// one opens nothing), in the same hold of the GIL as the handler's first call;
// handler(None) once when the stream ends, however it ends. A handler that raises
// ends its stream with INTERNAL (the exception is reported by Python's
// sys.unraisablehook; the picker's handler catches and counts its own first).
#pragma once

#include <Python.h>

#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/rpc_service_method.h>
#include <grpcpp/support/method_handler.h>

namespace geoserve {

using RawStream = grpc::ServerReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>;

// The GIL for one stream: its thread state lives as long as the stream. Made with
// the GIL held (the stream's first call); held only between take() and give().
class StreamGil {
 public:
  StreamGil() : state_(PyGILState_Ensure()), saved_(nullptr) {}
  ~StreamGil() {
    if (saved_ != nullptr) PyEval_RestoreThread(saved_);
    PyGILState_Release(state_);
  }
  void take() {
    PyEval_RestoreThread(saved_);
    saved_ = nullptr;
  }
  void give() { saved_ = PyEval_SaveThread(); }

 private:
  PyGILState_STATE state_;
  PyThreadState* saved_;  // null while this thread holds the GIL
};

// One streaming method served as raw bytes (a client-streaming one too: on the
// wire it is the same stream, and its handler writes nothing). Registered as a
// method of its own service, so a server holds one per method path.
class RawProcessor final : public grpc::Service {
 public:
  RawProcessor(const std::string& path, PyObject* factory) : path_(path), factory_(factory) {
    AddMethod(new grpc::internal::RpcServiceMethod(
        path_.c_str(), grpc::internal::RpcMethod::BIDI_STREAMING,
        new grpc::internal::BidiStreamingHandler<RawProcessor, grpc::ByteBuffer, grpc::ByteBuffer>(
            [](RawProcessor* self, grpc::ServerContext*, RawStream* stream) { return self->Process(stream); },
            this)));
  }

  grpc::Status Process(RawStream* stream) {
    grpc::ByteBuffer in;
    if (!stream->Read(&in)) return grpc::Status::OK;  // ended before its first message: nothing to open
    StreamGil gil;  // the GIL, for the handler and its first message in one go
    PyObject* handler = nullptr;
    grpc::Status status = grpc::Status::OK;
    std::vector<grpc::Slice> slices;
    std::vector<grpc::ByteBuffer> out;
    std::vector<Standing> standing;
    bool done = false;
    bool held = true;
    do {
      slices.clear();
      out.clear();
      if (!in.Dump(&slices).ok()) {
        status = grpc::Status(grpc::StatusCode::INTERNAL, "geoserve: unreadable message");
        break;
      }
      const Standing* answered = Find(standing, slices);
      if (answered != nullptr) {
        if (!stream->Write(answered->answer)) break;
        if (!answered->notify) continue;
      }
      if (!held) gil.take();
      if (handler == nullptr) {
        handler = PyObject_CallNoArgs(factory_);
        if (handler == nullptr) {
          PyErr_WriteUnraisable(factory_);
          gil.give();
          return grpc::Status(grpc::StatusCode::INTERNAL, "geoserve: the picker could not open the stream");
        }
      }
      bool ok = Call(handler, slices, in.Length(), &out, &done, &standing);
      gil.give();
      held = false;
      if (!ok) {
        status = grpc::Status(grpc::StatusCode::INTERNAL, "geoserve: the picker failed on this stream");
        break;
      }
      if (answered != nullptr) continue;  // notified: answered already
      for (const auto& answer : out) {
        if (!stream->Write(answer)) {
          done = true;
          break;
        }
      }
    } while (!done && stream->Read(&in));
    if (!held) gil.take();
    if (handler != nullptr) {
      PyObject* closed = PyObject_CallOneArg(handler, Py_None);
      if (closed == nullptr) PyErr_WriteUnraisable(handler);
      Py_XDECREF(closed);
      Py_DECREF(handler);
    }
    return status;  // gil's destructor gives the GIL back and drops the thread state
  }

 private:
  struct Standing {
    int tag;
    bool notify;
    grpc::ByteBuffer answer;
  };

  static const Standing* Find(const std::vector<Standing>& standing, const std::vector<grpc::Slice>& slices) {
    if (standing.empty() || slices.empty() || slices[0].size() == 0) return nullptr;
    int tag = slices[0].begin()[0];
    for (const auto& s : standing)
      if (s.tag == tag) return &s;
    return nullptr;
  }

  // One message through the handler; false if it raised or answered nonsense.
  static bool Call(PyObject* handler, const std::vector<grpc::Slice>& slices, size_t length,
                   std::vector<grpc::ByteBuffer>* out, bool* done, std::vector<Standing>* standing) {
    PyObject* data = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(length));
    if (data == nullptr) {
      PyErr_WriteUnraisable(handler);
      return false;
    }
    char* at = PyBytes_AS_STRING(data);
    for (const auto& slice : slices) {
      memcpy(at, slice.begin(), slice.size());
      at += slice.size();
    }
    PyObject* result = PyObject_CallOneArg(handler, data);
    Py_DECREF(data);
    bool ok = result != nullptr && PyTuple_Check(result) &&
              (PyTuple_GET_SIZE(result) == 2 || PyTuple_GET_SIZE(result) == 3) &&
              PyList_Check(PyTuple_GET_ITEM(result, 0));
    if (ok) {
      PyObject* answers = PyTuple_GET_ITEM(result, 0);
      for (Py_ssize_t i = 0; ok && i < PyList_GET_SIZE(answers); ++i) {
        PyObject* answer = PyList_GET_ITEM(answers, i);
        if (!PyBytes_Check(answer)) {
          ok = false;
          break;
        }
        grpc::Slice slice(PyBytes_AS_STRING(answer), static_cast<size_t>(PyBytes_GET_SIZE(answer)));
        out->emplace_back(&slice, 1);
      }
      *done = PyObject_IsTrue(PyTuple_GET_ITEM(result, 1)) == 1;
      if (ok && PyTuple_GET_SIZE(result) == 3 && PyTuple_GET_ITEM(result, 2) != Py_None)
        ok = SetStanding(PyTuple_GET_ITEM(result, 2), standing);
    }
    if (!ok) {
      if (!PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError,
                        "a picker handler answers (list[bytes], bool[, tuple[(int, bytes, bool), ...] | None])");
      PyErr_WriteUnraisable(handler);
    }
    Py_XDECREF(result);
    return ok;
  }

  static bool SetStanding(PyObject* specs, std::vector<Standing>* standing) {
    if (!PyTuple_Check(specs)) return false;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(specs); ++i) {
      PyObject* spec = PyTuple_GET_ITEM(specs, i);
      if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 3 || !PyLong_Check(PyTuple_GET_ITEM(spec, 0)) ||
          !PyBytes_Check(PyTuple_GET_ITEM(spec, 1)))
        return false;
      long tag = PyLong_AsLong(PyTuple_GET_ITEM(spec, 0));
      int notify = PyObject_IsTrue(PyTuple_GET_ITEM(spec, 2));
      if (tag < 0 || tag > 255 || notify < 0) return false;
      PyObject* answer = PyTuple_GET_ITEM(spec, 1);
      grpc::Slice slice(PyBytes_AS_STRING(answer), static_cast<size_t>(PyBytes_GET_SIZE(answer)));
      Standing entry{static_cast<int>(tag), notify == 1, grpc::ByteBuffer(&slice, 1)};
      bool replaced = false;
      for (auto& s : *standing) {
        if (s.tag == entry.tag) {
          s = entry;
          replaced = true;
        }
      }
      if (!replaced) standing->push_back(entry);
    }
    return true;
  }

  std::string path_;  // the method's full path (gRPC keeps a pointer to it)
  PyObject* factory_;  // borrowed: the Python owner keeps it alive while the server runs
};

// The server: raw streaming methods plus gRPC's default health service.
class PumpServer {
 public:
  // A method path and its factory (borrowed, as above); before Start.
  void Add(const std::string& path, PyObject* factory) {
    services_.push_back(std::make_unique<RawProcessor>(path, factory));
  }

  // Listens on host:port (0: any free port); returns the bound port, 0 on failure.
  int Start(const std::string& host, int port, int max_message_bytes, int max_pollers) {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    int bound = 0;
    builder.AddListeningPort(host + ":" + std::to_string(port), grpc::InsecureServerCredentials(), &bound);
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    builder.SetMaxReceiveMessageSize(max_message_bytes);
    builder.SetSyncServerOption(grpc::ServerBuilder::NUM_CQS, 1);
    builder.SetSyncServerOption(grpc::ServerBuilder::MAX_POLLERS, max_pollers);
    for (auto& service : services_) builder.RegisterService(service.get());
    server_ = builder.BuildAndStart();
    if (server_ == nullptr || bound == 0) {
      server_.reset();
      return 0;
    }
    return bound;
  }

  void SetServing(const std::string& service, bool serving) {
    if (server_ != nullptr && server_->GetHealthCheckService() != nullptr)
      server_->GetHealthCheckService()->SetServingStatus(service, serving);
  }

  // Stops listening, cancels the streams still open after grace_ms and waits for
  // their handlers to return. Call without the GIL: the handlers need it to finish.
  void Stop(int grace_ms) {
    if (server_ == nullptr) return;
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(grace_ms));
    server_->Wait();
    server_.reset();
  }

 private:
  std::vector<std::unique_ptr<RawProcessor>> services_;
  std::unique_ptr<grpc::Server> server_;
};

}  // namespace geoserve
