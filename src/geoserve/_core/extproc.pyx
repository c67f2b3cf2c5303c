# distutils: language = c++
# The native transport of the Envoy endpoint picker (extproc_pump.h): a gRPC C++
# server that moves the messages of streaming methods (ext_proc's, the access log
# service's) as bytes between Envoy and a Python handler per stream. Built only where gRPC C++ is installed (setup.py); the picker's
# logic is geoserve.integrations.envoy's, the same for both transports.
from cpython.ref cimport PyObject
from libcpp.string cimport string


cdef extern from "extproc_pump.h" namespace "geoserve" nogil:
    cdef cppclass PumpServer:
        PumpServer()
        void Add(const string& path, PyObject* factory)
        int Start(const string& host, int port, int max_message_bytes, int max_pollers)
        void SetServing(const string& service, bint serving)
        void Stop(int grace_ms)


PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


cdef class NativeServer:
    """``factory()`` -> a handler per ext_proc stream (see extproc_pump.h);
    ``methods``: more streaming methods, full path -> factory (a client-streaming
    method's handlers answer nothing); ``start(host, port)`` binds and returns the
    port; ``stop(grace_s)`` cancels what is still open after the grace and waits
    for every handler to return."""

    cdef PumpServer* server
    cdef dict factories
    cdef readonly int port

    def __cinit__(self, factory, methods=None):
        factories = {PROCESS: factory, **(methods or {})}
        for path, made in factories.items():
            if not isinstance(path, str) or not path.startswith("/") or path.count("/") != 2:
                raise ValueError(f"a method's path is /package.Service/Method, not {path!r}")
            if not callable(made):
                raise TypeError(f"the factory of {path} must be callable")
        self.factories = factories  # kept alive here: the server borrows them
        self.server = new PumpServer()
        for path, made in factories.items():
            self.server.Add(path.encode(), <PyObject*>made)
        self.port = 0

    def __dealloc__(self):
        if self.server != NULL:
            with nogil:
                self.server.Stop(0)
            del self.server
            self.server = NULL

    def start(self, str host="127.0.0.1", int port=0, int max_message_bytes=(4 << 20) + (64 << 10),
              int max_pollers=2):
        if self.port:
            raise RuntimeError("the server is already started")
        cdef string address = host.encode()
        cdef int bound
        with nogil:
            bound = self.server.Start(address, port, max_message_bytes, max_pollers)
        if bound == 0:
            raise OSError(f"the native ext_proc server could not listen on {host}:{port}")
        self.port = bound
        return bound

    def set_serving(self, str service, bint serving):
        """The gRPC health service's status for ``service`` ('' = the server)."""
        self.server.SetServing(service.encode(), serving)

    def stop(self, double grace_s=0.5):
        cdef int grace_ms = <int>(grace_s * 1000)
        with nogil:
            self.server.Stop(grace_ms)
        self.port = 0
