"""fedge's ClientApp plus a mod that poisons the updates of clients named ``poison``: a test double.

Round 1 sends NaN, round 2 a huge change of the trained tensors (LoRA B; A left as the round froze it, so the
norm check is what must catch it), round 3 a wrong shape; the server must reject each and go on.
Honest clients run fedge's ClientApp unchanged.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedge.common import wire
from fedge.edge_client.flower_client import evaluate_round, train_round


def poison(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    if context.node_config.get("name") != "poison" or msg.metadata.message_type != "train":
        return reply
    arrays = wire.from_record(reply.content[wire.ADAPTER])
    name = next(iter(arrays))
    rnd = int(msg.content[wire.CONFIG][wire.Cfg.ROUND])
    if rnd == 1:
        arrays[name] = np.full_like(arrays[name], np.nan)
    elif rnd == 2:
        arrays = {k: v * 1e4 + 1.0 if "lora_B" in k else v for k, v in arrays.items()}
    else:
        arrays[name] = np.zeros((3, 3), np.float32)
    reply.content[wire.ADAPTER] = wire.to_record(arrays)
    return reply


app = ClientApp(mods=[poison])
app.train()(train_round)
app.evaluate()(evaluate_round)
