"""fedge's ClientApp plus two mods, test doubles of a bad client; honest clients run fedge's ClientApp unchanged.

``poison`` (clients named ``poison``): round 1 sends NaN, round 2 a huge change of the trained tensors (LoRA B; A
left as the round froze it, so the norm check is what must catch it), round 3 a wrong shape.

``garble`` (clients named ``garbled``): the reply's bytes corrupted as a broken link or middlebox would: round 1
overwrites every array's payload with random bytes (its .npy header kept), round 2 cuts every array short, round 3
breaks every .npy header; its evaluations (evaluate replies, and the score a train reply carries) report an
exact match of 37.5. The server must reject each and go on.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedge.common import wire
from fedge.edge_client.federation.clientapp import evaluate_round, train_round
from fedge.quantization.codecs import HEADER_KEY, Encoded, decode, encode


def poison(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    if context.node_config.get("name") != "poison" or msg.metadata.message_type != "train":
        return reply
    arrays = wire.from_record(reply.content[wire.ADAPTER])
    encoded = HEADER_KEY in arrays  # an uncoded reply with A frozen is B's change, in the codec's "none" form
    if encoded:
        arrays = decode(Encoded.from_arrays(arrays))
    name = next(k for k in arrays if "lora_B" in k)
    rnd = int(msg.content[wire.CONFIG][wire.Cfg.ROUND])
    if rnd == 1 and not encoded:
        arrays[name] = np.full_like(arrays[name], np.nan)
    elif rnd == 2:
        arrays = {k: v * 1e4 + 1.0 if "lora_B" in k else v for k, v in arrays.items()}
    elif rnd == 3:
        arrays[name] = np.zeros((3, 3), np.float32)
    if encoded:  # fedge's encoder refuses NaN: the payload's floats are overwritten after it
        arrays = encode(arrays, "none").to_arrays()
        if rnd == 1:
            arrays = {k: np.full_like(v, np.nan) if v.dtype == np.float32 else v for k, v in arrays.items()}
    reply.content[wire.ADAPTER] = wire.to_record(arrays)
    return reply


def garble(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    if context.node_config.get("name") != "garbled" or reply.has_error():
        return reply
    if msg.metadata.message_type != "train":
        reply.content[wire.METRICS][wire.Metric.EXACT_MATCH] = 37.5
        return reply
    if wire.Metric.PRIOR + wire.Metric.EXACT_MATCH in reply.content[wire.METRICS]:  # its score of what it received
        reply.content[wire.METRICS][wire.Metric.PRIOR + wire.Metric.EXACT_MATCH] = 37.5
    rnd = int(msg.content[wire.CONFIG][wire.Cfg.ROUND])
    rng = np.random.default_rng(rnd)
    record = reply.content[wire.ADAPTER]
    payload = [record[wire.PACKED_DATA]] if wire.PACKED_DATA in record and rnd < 3 else record.values()
    for array in payload:  # a packed reply: its tensors' bytes (the index intact), and in round 3 every header
        data = bytearray(array.data)
        body = data.index(b"\n") + 1  # the .npy header ends with a newline
        if rnd == 1:
            data[body:] = rng.integers(0, 256, len(data) - body, dtype=np.uint8).tobytes()
        elif rnd == 2:
            del data[-3:]
        else:
            data[:6] = b"\x00" * 6
        array.data = bytes(data)
    return reply


app = ClientApp(mods=[poison, garble])
app.train()(train_round)
app.evaluate()(evaluate_round)
