"""LlamaIndex's finetuning guides, run on lit_embed by changing one import line.

The code of the guides "Finetune Embeddings" (finetune_embedding.ipynb) and "Finetuning an Adapter on Top of any
Black-Box Embedding Model" (finetune_embedding_adapter.ipynb), from where they load the generated data onwards
(``generate_qa_embedding_pairs`` needs an LLM; lit_embed.generate does that step). What changed:

    - from llama_index.finetuning import SentenceTransformersFinetuneEngine, EmbeddingAdapterFinetuneEngine
    - from llama_index.core.evaluation import EmbeddingQAFinetuneDataset
    + from lit_embed.llamaindex import (
    +     EmbeddingAdapterFinetuneEngine, EmbeddingQAFinetuneDataset, SentenceTransformersFinetuneEngine
    + )

(``EmbeddingQAFinetuneDataset`` left llama-index-core with 0.14, and llama-index-finetuning no longer imports);
``TwoLayerNN`` is imported from ``llama_index.embeddings.adapter.utils``, where it lives now, and the OpenAI
comparison is left out. Run it where ``train_dataset.json`` and ``val_dataset.json`` are:

    python examples/llamaindex_guide.py

``GUIDE_MODEL_ID`` (default ``BAAI/bge-small-en``, as in the guides) picks another model, e.g. a local copy;
``GUIDE_EPOCHS`` scales the guides' epochs down for a smoke run.
"""

import os

import pandas as pd
from llama_index.core import Settings, VectorStoreIndex
from llama_index.core.embeddings import resolve_embed_model
from llama_index.core.schema import TextNode
from llama_index.embeddings.adapter.utils import TwoLayerNN
from tqdm import tqdm

from lit_embed.llamaindex import (
    EmbeddingAdapterFinetuneEngine,
    EmbeddingQAFinetuneDataset,
    SentenceTransformersFinetuneEngine,
)

MODEL_ID = os.environ.get("GUIDE_MODEL_ID", "BAAI/bge-small-en")
EPOCHS = os.environ.get("GUIDE_EPOCHS")
Settings.llm = None  # retrieval only: no LLM is asked anything

# ## Load the generated data

train_dataset = EmbeddingQAFinetuneDataset.from_json("train_dataset.json")
val_dataset = EmbeddingQAFinetuneDataset.from_json("val_dataset.json")

# ## Run Embedding Finetuning (finetune_embedding.ipynb)

finetune_engine = SentenceTransformersFinetuneEngine(
    train_dataset,
    model_id=MODEL_ID,
    model_output_path="test_model",
    val_dataset=val_dataset,
    **({"epochs": int(EPOCHS)} if EPOCHS else {}),
)
finetune_engine.finetune()
embed_model = finetune_engine.get_finetuned_model()
print(embed_model)


# ## Evaluate finetuned model: hit rate with a VectorStoreIndex retriever


def evaluate(dataset, embed_model, top_k=5, verbose=False):
    corpus = dataset.corpus
    queries = dataset.queries
    relevant_docs = dataset.relevant_docs

    nodes = [TextNode(id_=id_, text=text) for id_, text in corpus.items()]
    index = VectorStoreIndex(nodes, embed_model=embed_model, show_progress=True)
    retriever = index.as_retriever(similarity_top_k=top_k)

    eval_results = []
    for query_id, query in tqdm(queries.items()):
        retrieved_nodes = retriever.retrieve(query)
        retrieved_ids = [node.node.node_id for node in retrieved_nodes]
        expected_id = relevant_docs[query_id][0]
        rank = None
        for idx, id in enumerate(retrieved_ids):
            if id == expected_id:
                rank = idx + 1
                break
        is_hit = rank is not None  # assume 1 relevant doc
        mrr = 0 if rank is None else 1 / rank

        eval_result = {
            "is_hit": is_hit,
            "mrr": mrr,
            "retrieved": retrieved_ids,
            "expected": expected_id,
            "query": query_id,
        }
        eval_results.append(eval_result)
    return eval_results


def display_results(names, results_arr):
    """Display results from evaluate."""
    hit_rates = []
    mrrs = []
    for _name, results in zip(names, results_arr, strict=True):
        results_df = pd.DataFrame(results)
        hit_rate = results_df["is_hit"].mean()
        mrr = results_df["mrr"].mean()
        hit_rates.append(hit_rate)
        mrrs.append(mrr)

    final_df = pd.DataFrame({"retrievers": names, "hit_rate": hit_rates, "mrr": mrrs})
    print(final_df)


bge = "local:" + MODEL_ID
bge_val_results = evaluate(val_dataset, bge)

finetuned = "local:test_model"
val_results_finetuned = evaluate(val_dataset, finetuned)

display_results(["bge", "finetuned"], [bge_val_results, val_results_finetuned])

# ## Finetune an adapter (finetune_embedding_adapter.ipynb)

base_embed_model = resolve_embed_model("local:" + MODEL_ID)

finetune_engine = EmbeddingAdapterFinetuneEngine(
    train_dataset,
    base_embed_model,
    model_output_path="model_output_test",
    # bias=True,
    epochs=int(EPOCHS) if EPOCHS else 4,
    verbose=True,
    # optimizer_class=torch.optim.SGD,
    # optimizer_params={"lr": 0.01}
)
finetune_engine.finetune()
embed_model = finetune_engine.get_finetuned_model()

# alternatively import model
# from llama_index.embeddings.adapter import LinearAdapterEmbeddingModel
# embed_model = LinearAdapterEmbeddingModel(base_embed_model, "model_output_test")

ft_val_results = evaluate(val_dataset, embed_model)
display_results(["bge", "ft"], [bge_val_results, ft_val_results])

# ## Finetune a Two-Layer Adapter

dim = len(base_embed_model.get_text_embedding("hello world"))  # the guide writes 384, bge-small-en's size
adapter_model = TwoLayerNN(
    dim,  # input dimension
    1024,  # hidden dimension
    dim,  # output dimension
    bias=True,
    add_residual=True,
)

finetune_engine = EmbeddingAdapterFinetuneEngine(
    train_dataset,
    base_embed_model,
    model_output_path="model5_output_test",
    model_checkpoint_path="model5_ck",
    adapter_model=adapter_model,
    epochs=int(EPOCHS) if EPOCHS else 25,
    verbose=True,
)
finetune_engine.finetune()
embed_model_2layer = finetune_engine.get_finetuned_model(adapter_cls=TwoLayerNN)

ft_val_results_2layer = evaluate(val_dataset, embed_model_2layer)
display_results(["bge", "ft_2layer"], [bge_val_results, ft_val_results_2layer])
