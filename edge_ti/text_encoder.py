"""Token injection: the ONNX CLIP text encoder patched to read new token rows from an input.

The token-embedding lookup `Gather(table [V, D], input_ids)` becomes
`Gather(Concat(table, extra_embeddings [m, D]), input_ids)`, so ids V..V+m-1 read the extra rows.
A whole CMA-ES population goes through in one call: candidate p's n vectors sit at rows
V + p*n + j and each of its prompt rows uses those ids.
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


def _find_token_gather(graph, ids_input):
    """The Gather whose indices come from input_ids (through reshapes/casts) and whose data is a 2-D table."""
    inits = {t.name: t for t in graph.initializer}
    derived = {ids_input}
    for node in graph.node:  # nodes are topologically sorted in a valid ONNX graph
        if node.op_type in _PASS_THROUGH and node.input and node.input[0] in derived:
            derived.update(node.output)
    for node in graph.node:
        if node.op_type == "Gather" and node.input[1] in derived:
            table = inits.get(node.input[0])
            if table is not None and len(table.dims) == 2:
                return node, table
    return None, None


def patch_text_encoder(src_path, dst_dir):
    """Write the patched text encoder to dst_dir/model.onnx (+ .data) and return the table [V, D].

    Never touches src_path. Written in a temporary folder renamed into place, so a crash leaves
    no half-written cache.
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
    if outputs[hidden] not in (0, 3):  # 0: shape not recorded
        raise EdgeTIError(f"{src_path}: no last hidden state [batch, tokens, width] among its outputs "
                          f"({', '.join(outputs)}): Stable Diffusion's UNet reads it")
    graph.input.append(helper.make_tensor_value_info(EXTRA_INPUT, table.data_type, ["extra_rows", table.dims[1]]))
    full_table = table.name + "_with_extra"
    graph.node.insert(list(graph.node).index(gather),
                      helper.make_node("Concat", [table.name, EXTRA_INPUT], [full_table], axis=0,
                                       name="edge_ti_concat_extra_embeddings"))
    gather.input[0] = full_table
    table_array = numpy_helper.to_array(table).astype(np.float32)
    with atomic_folder(dst_dir, exist_ok=True) as tmp_dir:  # another process may patch it too
        onnx.save(model, os.path.join(tmp_dir, "model.onnx"), save_as_external_data=True,
                  all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
        np.save(os.path.join(tmp_dir, "token_embeddings.npy"), table_array)
    return table_array


def table_dtype(session):
    """numpy dtype of the extra_embeddings input (float32, or float16 for an fp16 export)."""
    kind = next(i.type for i in session.get_inputs() if i.name == EXTRA_INPUT)
    return np.float16 if kind == "tensor(float16)" else np.float32


def encode(session, input_ids, extra_embeddings):
    """input_ids int [B, L], extra_embeddings [m, D] -> (last_hidden_state [B, L, D], pooled [B, D]);
    pooled is None for an export without a pooler_output (the UNet reads only the hidden state)."""
    feeds = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds["input_ids"] = input_ids.astype(np.int32 if inp.type == "tensor(int32)" else np.int64)
        elif inp.name == EXTRA_INPUT:
            feeds[EXTRA_INPUT] = np.ascontiguousarray(extra_embeddings, dtype=table_dtype(session))
    names = [o.name for o in session.get_outputs()]
    results = dict(zip(names, session.run(None, feeds)))
    hidden = results.get(HIDDEN_OUTPUT, results[names[0]])
    pooled = results.get("pooler_output")
    return hidden.astype(np.float32), None if pooled is None else pooled.astype(np.float32)


def population_ids(prompt_ids, vocab_size, vectors, population):
    """Prompt ids [K, L] using ids V..V+n-1 -> [P*K, L], candidate p's rows shifted to V+p*n.. (row p*K + k)."""
    ids = np.tile(prompt_ids[None], (population, 1, 1))                 # (P, K, L)
    offsets = (np.arange(population) * vectors)[:, None, None]          # (P, 1, 1)
    ids = np.where(ids >= vocab_size, ids + offsets, ids)
    return ids.reshape(population * prompt_ids.shape[0], prompt_ids.shape[1])


def encode_population(session, prompt_ids, candidates, vocab_size):
    """prompt_ids [K, L], candidates [P, n, D] -> last_hidden_state [P, K, L, D] in one call."""
    P, n, D = candidates.shape
    K, L = prompt_ids.shape
    ids = population_ids(prompt_ids, vocab_size, n, P)                  # (P*K, L)
    hidden, _ = encode(session, ids, candidates.reshape(P * n, D))      # (P*K, L, D)
    return hidden.reshape(P, K, L, D)
