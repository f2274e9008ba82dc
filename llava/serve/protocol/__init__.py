"""The serving wire protocol as typed models, one module per protocol, all JSON:

* :mod:`~llava.serve.protocol.llava`: LLaVA's controller/worker protocol (``/register_worker`` ...
  ``/worker_generate_stream``), interoperable with LLaVA's own services and clients;
* :mod:`~llava.serve.protocol.ecso`: the ECSO stream, one event per pipeline step;
* :mod:`~llava.serve.protocol.openai`: OpenAI chat completions, with the optional ``ecso`` switch;
* :mod:`~llava.serve.protocol.fields`: the field types they share and the one description of a validation error.

Streams (LLaVA chunks and ECSO events) are framed as ``json + b"\\0"`` (:mod:`llava.http_client`). Range checks live
here, so every service rejects the same values with the same message, which names the field and the value.
"""
