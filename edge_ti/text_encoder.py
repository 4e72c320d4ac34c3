"""Token injection: the ONNX CLIP text encoder patched to read new token rows from an input.

The token-embedding lookup `Gather(table [V, D], input_ids)` becomes
`Gather(Concat(table, extra_embeddings [m, D]), input_ids)`, so ids V..V+m-1 read the extra rows.
A whole CMA-ES population goes through in one call: candidate p's n vectors sit at rows
V + p*n + j and each of its prompt rows uses those ids.

The pooled output (SDXL's `text_embeds`, which its UNet reads) is the final state at the
end-of-text token. Exports of configs with the legacy `eos_token_id: 2` (SD 1.x's and SDXL's
text encoders) find that token as `ArgMax(input_ids)`, the largest id -- which a new token's id
>= V would win (transformers' CLIPTextTransformer says as much: such a model "can't work correctly
with extra new tokens added"; diffusers then pools an SDXL embedding at the placeholder). The
patch hides ids >= V from that ArgMax, so the state is pooled at the end-of-text token, as
AUTOMATIC1111 (which never gives a new token its own id) pools it.
"""
import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import EdgeTIError
from .files import atomic_folder

EXTRA_INPUT = "extra_embeddings"
# what edge-ti needs of the text encoder: optimum's name for it (else the first output is taken)
HIDDEN_OUTPUT = "last_hidden_state"
# ops that carry input_ids to the embedding Gather without changing which ids they are
_PASS_THROUGH = {"Cast", "Reshape", "Identity", "Flatten", "Squeeze", "Unsqueeze"}
# the penultimate layer's hidden state, which SDXL's UNet reads: optimum names each layer's output
# hidden_states.0 (the embeddings) .. hidden_states.N (the last layer, before the final layer norm)
HIDDEN_STATES_PREFIX = "hidden_states."
# the pooled outputs, projected (CLIPTextModelWithProjection: SDXL's text_encoder_2) or not
POOLED_OUTPUTS = ("text_embeds", "pooler_output")


def _derived_from(graph, ids_input):
    """The names that carry input_ids unchanged (through reshapes and casts)."""
    derived = {ids_input}
    for node in graph.node:  # nodes are topologically sorted in a valid ONNX graph
        if node.op_type in _PASS_THROUGH and node.input and node.input[0] in derived:
            derived.update(node.output)
    return derived


def _find_token_gather(graph, ids_input):
    """The Gather whose indices come from input_ids (through reshapes/casts) and whose data is a 2-D table."""
    inits = {t.name: t for t in graph.initializer}
    derived = _derived_from(graph, ids_input)
    for node in graph.node:
        if node.op_type == "Gather" and node.input[1] in derived:
            table = inits.get(node.input[0])
            if table is not None and len(table.dims) == 2:
                return node, table
    return None, None


def patch_text_encoder(src_path, dst_dir, needs_hidden_state=True):
    """Write the patched text encoder to dst_dir/model.onnx (+ .data) and return the table [V, D].

    needs_hidden_state: refuse a graph without a [batch, tokens, width] output (what the UNet
    reads); False for CLIP's text tower, whose output is the projected feature. Never touches
    src_path. Written in a temporary folder renamed into place, so a crash leaves no half-written cache.
    """
    try:
        model = onnx.load(src_path)
    except Exception as err:  # onnx raises DecodeError, OSError, ... for a broken file
        raise EdgeTIError(f"{src_path}: not a readable ONNX model ({err})") from None
    graph = model.graph
    names = [i.name for i in graph.input]
    if "input_ids" not in names:
        raise EdgeTIError(f"{src_path}: not a CLIP text encoder (no input_ids input; inputs: {names})")
    gather, table = _find_token_gather(graph, "input_ids")
    if gather is None:
        raise EdgeTIError(f"{src_path}: not a CLIP text encoder (no token-embedding Gather reads input_ids)")
    outputs = {o.name: len(o.type.tensor_type.shape.dim) for o in graph.output}
    hidden = HIDDEN_OUTPUT if HIDDEN_OUTPUT in outputs else graph.output[0].name
    if needs_hidden_state and outputs[hidden] not in (0, 3):  # 0: shape not recorded
        raise EdgeTIError(f"{src_path}: no last hidden state [batch, tokens, width] among its outputs "
                          f"({', '.join(outputs)}): Stable Diffusion's UNet reads it")
    graph.input.append(helper.make_tensor_value_info(EXTRA_INPUT, table.data_type, ["extra_rows", table.dims[1]]))
    full_table = table.name + "_with_extra"
    graph.node.insert(list(graph.node).index(gather),
                      helper.make_node("Concat", [table.name, EXTRA_INPUT], [full_table], axis=0,
                                       name="edge_ti_concat_extra_embeddings"))
    gather.input[0] = full_table
    _hide_new_ids_from_eos_argmax(graph, table.dims[0])
    table_array = numpy_helper.to_array(table).astype(np.float32)
    with atomic_folder(dst_dir, exist_ok=True) as tmp_dir:  # another process may patch it too
        onnx.save(model, os.path.join(tmp_dir, "model.onnx"), save_as_external_data=True,
                  all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
        np.save(os.path.join(tmp_dir, "token_embeddings.npy"), table_array)
    return table_array


def _hide_new_ids_from_eos_argmax(graph, vocab_size):
    """ArgMax(ids) (legacy end-of-text pooling) -> ArgMax(ids < V ? ids : 0): new tokens never win it."""
    derived = _derived_from(graph, "input_ids")
    for k, node in enumerate(list(graph.node)):
        if node.op_type != "ArgMax" or node.input[0] not in derived:
            continue
        name = f"edge_ti_eos_{k}"
        graph.initializer.extend([numpy_helper.from_array(np.array(vocab_size, np.int32), f"{name}_vocab"),
                                  numpy_helper.from_array(np.array(0, np.int32), f"{name}_zero")])
        new = [helper.make_node("Cast", [node.input[0]], [f"{name}_ids"], to=onnx.TensorProto.INT32,
                                name=f"{name}_cast"),
               helper.make_node("Less", [f"{name}_ids", f"{name}_vocab"], [f"{name}_old"], name=f"{name}_less"),
               helper.make_node("Where", [f"{name}_old", f"{name}_ids", f"{name}_zero"], [f"{name}_masked"],
                                name=f"{name}_where")]
        at = list(graph.node).index(node)
        for offset, extra in enumerate(new):
            graph.node.insert(at + offset, extra)
        node.input[0] = f"{name}_masked"


def table_dtype(session):
    """numpy dtype of the extra_embeddings input (float32, or float16 for an fp16 export)."""
    kind = next(i.type for i in session.get_inputs() if i.name == EXTRA_INPUT)
    return np.float16 if kind == "tensor(float16)" else np.float32


def penultimate_output(session):
    """The name of the penultimate layer's hidden-state output (SDXL reads it), or None if not exported."""
    layers = sorted(int(o.name[len(HIDDEN_STATES_PREFIX):]) for o in session.get_outputs()
                    if o.name.startswith(HIDDEN_STATES_PREFIX) and o.name[len(HIDDEN_STATES_PREFIX):].isdigit())
    return f"{HIDDEN_STATES_PREFIX}{layers[-2]}" if len(layers) >= 2 else None


def encode(session, input_ids, extra_embeddings, hidden_output=None):
    """input_ids int [B, L], extra_embeddings [m, D] -> (hidden state [B, L, D], pooled [B, D']).

    hidden_output: the output to return as the hidden state (default: last_hidden_state, else the
    first output); pooled: text_embeds or pooler_output, None for an export without either."""
    feeds = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds["input_ids"] = input_ids.astype(np.int32 if inp.type == "tensor(int32)" else np.int64)
        elif inp.name == EXTRA_INPUT:
            feeds[EXTRA_INPUT] = np.ascontiguousarray(extra_embeddings, dtype=table_dtype(session))
    names = [o.name for o in session.get_outputs()]
    results = dict(zip(names, session.run(None, feeds)))
    hidden = results[hidden_output] if hidden_output else results.get(HIDDEN_OUTPUT, results[names[0]])
    pooled = next((results[name] for name in POOLED_OUTPUTS if name in results), None)
    return hidden.astype(np.float32), None if pooled is None else pooled.astype(np.float32)


def population_ids(prompt_ids, vocab_size, vectors, population):
    """Prompt ids [K, L] using ids V..V+n-1 -> [P*K, L], candidate p's rows shifted to V+p*n.. (row p*K + k)."""
    ids = np.tile(prompt_ids[None], (population, 1, 1))                 # (P, K, L)
    offsets = (np.arange(population) * vectors)[:, None, None]          # (P, 1, 1)
    ids = np.where(ids >= vocab_size, ids + offsets, ids)
    return ids.reshape(population * prompt_ids.shape[0], prompt_ids.shape[1])


def encode_population(session, prompt_ids, candidates, vocab_size, hidden_output=None):
    """prompt_ids [K, L], candidates [P, n, D] -> (hidden [P, K, L, D], pooled [P, K, D'] or None) in one call."""
    P, n, D = candidates.shape
    K, L = prompt_ids.shape
    ids = population_ids(prompt_ids, vocab_size, n, P)                  # (P*K, L)
    hidden, pooled = encode(session, ids, candidates.reshape(P * n, D), hidden_output)   # (P*K, L, D')
    return (hidden.reshape(P, K, L, hidden.shape[-1]),
            None if pooled is None else pooled.reshape(P, K, pooled.shape[-1]))
