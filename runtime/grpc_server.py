"""KServe v2 over gRPC: the `GRPCInferenceService` on `grpc.aio`, in the HTTP server's loop.

A thin translator, like runtime/http_server.py: every call goes to the same `Engine`
(`health()`, `admit()`, `infer()`, `statistics()`), and the messages are the protocol's
official generated ones (the `tritonclient` wheel ships `service_pb2` and
`model_config_pb2`; no hand-written protobuf). An inference request is turned into the
HTTP codec's own input (a JSON header and the raw tensor bytes) and parsed by
`protocol.parse_infer_request`, so both protocols accept and refuse exactly the same
requests, with the same messages. Errors map to gRPC status codes by the runtime's error
hierarchy (`STATUS`); a 503's retry delay travels as trailing metadata `retry-after`.

Cancellation: when a client cancels a call (or its deadline passes), grpc.aio cancels the
handler, which cancels the request's queued block, so queries not yet dispatched are never
computed. A call's gRPC deadline bounds the request timeout like `timeout_ms` does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import orjson
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from runtime import model_config
from runtime.engine import Engine
from runtime.errors import (
    BadRequest,
    ClientDisconnected,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    ServingError,
)
from runtime.protocol import NUMPY_TO_DATATYPE, InferRequest, parse_infer_request

logger = logging.getLogger(__name__)

STATUS: dict[type[ServingError], grpc.StatusCode] = {  # most specific first
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ServiceUnavailable: grpc.StatusCode.UNAVAILABLE,
    RequestTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    ClientDisconnected: grpc.StatusCode.CANCELLED,
}
# typed `contents` field of each accepted input datatype (InferTensorContents)
CONTENTS_FIELD = {"UINT8": "uint_contents", "FP32": "fp32_contents"}


def status_of(error: ServingError) -> grpc.StatusCode:
    for cls, code in STATUS.items():
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _parameter(value: Any) -> service_pb2.InferParameter:
    if isinstance(value, bool):
        return service_pb2.InferParameter(bool_param=value)
    if isinstance(value, int):
        return service_pb2.InferParameter(int64_param=value)
    if isinstance(value, float):
        return service_pb2.InferParameter(double_param=value)
    return service_pb2.InferParameter(string_param=str(value))


def _plain(parameter: service_pb2.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def http_form(request: service_pb2.ModelInferRequest) -> tuple[bytes, str | None]:
    """The request as the HTTP codec's input: (JSON header + binary tensors, header length).

    `raw_input_contents[i]` becomes input i's binary data; typed `contents` become its JSON
    `data`; anything the codec refuses is refused the same way for both protocols."""
    inputs, blobs = [], []
    finite = True  # orjson writes NaN/inf as null: a non-finite pixel goes through json
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} "
                         "inputs; give one per input, or use typed contents")
    for i, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                 "shape": list(tensor.shape)}
        params = {k: _plain(v) for k, v in tensor.parameters.items()}
        if raw:
            params["binary_data_size"] = len(raw[i])
            blobs.append(raw[i])
        elif tensor.HasField("contents"):
            field = CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise BadRequest(f"input {tensor.name!r}: datatype {tensor.datatype!r} has no "
                                 f"accepted typed contents; send one of {sorted(CONTENTS_FIELD)}")
            entry["data"] = list(getattr(tensor.contents, field))
            if field == "fp32_contents":
                finite = finite and all(map(math.isfinite, entry["data"]))
        if params:
            entry["parameters"] = params
        inputs.append(entry)
    body: dict[str, Any] = {"inputs": inputs}
    if request.id:
        body["id"] = request.id
    params = {k: _plain(v) for k, v in request.parameters.items()}
    if params:
        body["parameters"] = params
    if request.outputs:
        body["outputs"] = [{"name": o.name, **({"parameters": {
            k: _plain(v) for k, v in o.parameters.items()}} if o.parameters else {})}
            for o in request.outputs]
    # json writes NaN/inf as the codec's json fallback reads them: refused as over HTTP
    header = orjson.dumps(body) if finite else json.dumps(body).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), str(len(header))


class GrpcFrontend(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 gRPC service of one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.config = engine.config
        self.metrics = engine.metrics
        self.model_name = engine.model_name
        self.output_names = engine.manifest.output_names()

    # -- errors ------------------------------------------------------------------------------
    async def _abort(self, context: grpc.aio.ServicerContext, error: BaseException) -> None:
        if isinstance(error, ServingError):
            code, message = status_of(error), str(error)
            if isinstance(error, ServiceUnavailable):
                context.set_trailing_metadata((("retry-after", str(error.retry_after_s)),))
        else:  # a bug: INTERNAL with an id that the log has too
            error_id = uuid.uuid4().hex[:12]
            logger.error("internal error %s in a gRPC call", error_id, exc_info=error)
            code = grpc.StatusCode.INTERNAL
            message = f"internal error (id {error_id}; the server log has the details)"
        await context.abort(code, message)

    def _check_model(self, name: str, version: str) -> None:
        if name != self.model_name:
            raise NotFound(f"unknown model {name!r}; this server serves {self.model_name!r}")
        if version not in ("", "1"):
            raise NotFound(f"model {name!r} has version '1' only, got {version!r}")

    # -- health and metadata -----------------------------------------------------------------
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.engine.health().ready)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            self._check_model(request.name, request.version)
        except ServingError as exc:
            await self._abort(context, exc)
        return service_pb2.ModelReadyResponse(ready=self.engine.health().ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return json_format.ParseDict(model_config.server_metadata(),
                                     service_pb2.ServerMetadataResponse())

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            self._check_model(request.name, request.version)
        except ServingError as exc:
            await self._abort(context, exc)
        metadata = model_config.model_metadata(self.engine.manifest, self.config.mode)
        # gRPC's metadata message has no `parameters`: the rest is the same as HTTP's
        return json_format.ParseDict(metadata, service_pb2.ModelMetadataResponse(),
                                     ignore_unknown_fields=True)

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        try:
            self._check_model(request.name, request.version)
        except ServingError as exc:
            await self._abort(context, exc)
        config = model_config.model_config(self.engine.manifest, self.config)
        return service_pb2.ModelConfigResponse(
            config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        if request.name:
            try:
                self._check_model(request.name, request.version)
            except ServingError as exc:
                await self._abort(context, exc)
        stats = model_config.model_statistics(self.engine.manifest, self.engine.statistics())
        return json_format.ParseDict({"model_stats": [stats]},
                                     service_pb2.ModelStatisticsResponse())

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        ready = self.engine.health().ready
        models = model_config.repository_index(self.engine.manifest, ready)
        if request.ready:
            models = [m for m in models if m.get("state") == "READY"]
        return json_format.ParseDict({"models": models}, service_pb2.RepositoryIndexResponse())

    # -- inference ---------------------------------------------------------------------------
    async def _infer(self, request: service_pb2.ModelInferRequest,
                     time_remaining_s: float | None) -> service_pb2.ModelInferResponse:
        """One inference; raises ServingError (mapped by the callers)."""
        self._check_model(request.model_name, request.model_version)
        body, header_length = http_form(request)
        if len(body) > self.config.max_body_bytes:
            raise PayloadTooLarge(f"request of {len(body)} bytes exceeds the "
                                  f"{self.config.max_body_bytes}-byte limit (--max-body-bytes)")
        async with self.engine.admit() as admission:
            parsed = parse_infer_request(body, header_length, self.engine.manifest.input,
                                         self.output_names, self.config.max_batch_size)
            timeout_s = self._timeout_s(parsed, time_remaining_s)
            result = await self.engine.infer(admission, parsed.raw, timeout_s)
        names = list(result.tensors) if parsed.outputs is None else list(parsed.outputs)
        response = service_pb2.ModelInferResponse(model_name=self.model_name, model_version="1",
                                                  id=request.id)
        for key, value in result.parameters(self.config.mode).items():
            response.parameters[key].CopyFrom(_parameter(value))
        for name in names:
            array = result.tensors[name]
            response.outputs.add(name=name, datatype=NUMPY_TO_DATATYPE[array.dtype],
                                 shape=list(array.shape))
            response.raw_output_contents.append(
                np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes())
        return response

    def _timeout_s(self, parsed: InferRequest, time_remaining_s: float | None) -> float | None:
        """The request's timeout: its own parameter, bounded by the call's gRPC deadline."""
        if time_remaining_s is None:
            return parsed.timeout_s
        if parsed.timeout_s is None:
            return min(time_remaining_s, self.config.request_timeout_ms / 1000.0)
        return min(parsed.timeout_s, time_remaining_s)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        started = time.perf_counter()
        try:
            response = await self._infer(request, context.time_remaining())
        except asyncio.CancelledError:  # the client cancelled: its queued queries are dropped
            self.metrics.request_failure("ClientDisconnected", time.perf_counter() - started)
            raise
        except Exception as exc:  # noqa: BLE001 - every error leaves as a status code
            reason = type(exc).__name__ if isinstance(exc, ServingError) else "InternalError"
            self.metrics.request_failure(reason, time.perf_counter() - started)
            await self._abort(context, exc)
        self.metrics.request_success(time.perf_counter() - started)
        return response

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[Any], context: Any
                               ) -> AsyncIterator[Any]:
        """Bidirectional: every request is answered, ids echoed, in completion order; an
        error is a stream message (`error_message`), not the end of the stream."""
        answers: asyncio.Queue[Any] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def one(request: Any) -> None:
            started = time.perf_counter()
            try:
                response = await self._infer(request, None)
            except ServingError as exc:
                self.metrics.request_failure(type(exc).__name__, time.perf_counter() - started)
                await answers.put(service_pb2.ModelStreamInferResponse(
                    error_message=str(exc),
                    infer_response=service_pb2.ModelInferResponse(id=request.id)))
                return
            except Exception as exc:  # noqa: BLE001 - a bug answers this request only
                error_id = uuid.uuid4().hex[:12]
                logger.error("internal error %s in a gRPC stream", error_id, exc_info=exc)
                self.metrics.request_failure("InternalError", time.perf_counter() - started)
                await answers.put(service_pb2.ModelStreamInferResponse(
                    error_message=f"internal error (id {error_id}; the server log has the "
                                  "details)", infer_response=service_pb2.ModelInferResponse(
                                      id=request.id)))
                return
            self.metrics.request_success(time.perf_counter() - started)
            await answers.put(service_pb2.ModelStreamInferResponse(infer_response=response))

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.create_task(one(request))
                running.add(task)
                task.add_done_callback(running.discard)

        reader = asyncio.create_task(read())
        try:
            while not (reader.done() and not running and answers.empty()):
                getter = asyncio.ensure_future(answers.get())
                waiters: set[asyncio.Future[Any]] = {getter, *running}
                if not reader.done():
                    waiters.add(reader)
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                else:
                    getter.cancel()
            reader.result()  # a broken request stream ends the call with its error
        finally:  # the client went away: its requests give up (queued queries are dropped)
            reader.cancel()
            for task in running:
                task.cancel()


async def start_grpc(engine: Engine, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Serve the engine's gRPC service on host:port (0 = any free port); returns the server
    and its bound port."""
    limit = engine.config.max_body_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", limit),
                                      ("grpc.so_reuseport", 0)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(GrpcFrontend(engine), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    await server.start()
    return server, bound
