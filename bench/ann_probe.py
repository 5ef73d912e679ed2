"""Approximate-index libraries on a synthetic catalog, single-threaded: build time, recall@10 against exact, latency.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/ann_probe.py 50000 usearch,hnswlib,faiss

Clustered 384-d unit vectors (text embeddings cluster by topic: n/50 centres, noise 0.8), queries the mean of 5
random items (a reader's clicks). Figures and the choice: BENCHMARKS.md section 5. faiss and hnswlib are not
dependencies of gramrec: install them to compare.
"""
import sys
import time

import numpy as np

n=int(sys.argv[1]); d=384; k=10; nq=300
rng=np.random.default_rng(0)
C=rng.standard_normal((max(n//50,10),d),dtype=np.float32)
X=C[rng.integers(0,len(C),n)]+rng.standard_normal((n,d),dtype=np.float32)*0.8
X/=np.linalg.norm(X,axis=1,keepdims=True)
Q=np.stack([X[rng.integers(0,n,5)].mean(0) for _ in range(nq)]).astype(np.float32)
truth=np.stack([np.argpartition(-(X@q),k)[:k] for q in Q])
def rec(found): return np.mean([len(set(np.asarray(f).tolist())&set(t.tolist()))/k for f,t in zip(found,truth)])
def lat(f):
    ts=[]
    for q in Q: a=time.perf_counter(); f(q); ts.append(time.perf_counter()-a)
    return np.percentile(ts,50)*1e3, np.percentile(ts,99)*1e3
p50,p99=lat(lambda q: np.argpartition(-(X@q),k)[:k]); print(f"exact n={n}: p50 {p50:.2f} p99 {p99:.2f} ms",flush=True)
which=sys.argv[2].split(',')
if 'hnswlib' in which:
    import hnswlib
    t=time.perf_counter(); h=hnswlib.Index(space='ip',dim=d); h.init_index(max_elements=n,M=16,ef_construction=128); h.set_num_threads(1); h.add_items(X,np.arange(n)); bt=time.perf_counter()-t
    for ef in (32,64):
        h.set_ef(ef); found=[h.knn_query(q,k)[0][0] for q in Q]; p50,p99=lat(lambda q:h.knn_query(q,k))
        print(f"hnswlib M16 ef{ef}: build {bt:.1f}s recall {rec(found):.3f} p50 {p50:.2f} p99 {p99:.2f} ms",flush=True)
    del h
if 'usearch' in which:
    from usearch.index import Index
    for dt in ("f32","f16"):
        t=time.perf_counter(); u=Index(ndim=d,metric='ip',dtype=dt,connectivity=16,expansion_add=128,expansion_search=64); u.add(np.arange(n),X,threads=1); bt=time.perf_counter()-t
        found=[u.search(q,k).keys for q in Q]; p50,p99=lat(lambda q:u.search(q,k))
        print(f"usearch {dt} ef64: build {bt:.1f}s recall {rec(found):.3f} p50 {p50:.2f} p99 {p99:.2f} ms mem {u.memory_usage/1e6:.0f}MB",flush=True)
        del u
if 'faiss' in which:
    import faiss
    faiss.omp_set_num_threads(1)
    t=time.perf_counter(); f=faiss.IndexHNSWFlat(d,16,faiss.METRIC_INNER_PRODUCT); f.hnsw.efConstruction=128; f.add(X); bt=time.perf_counter()-t
    f.hnsw.efSearch=64; found=[f.search(q[None],k)[1][0] for q in Q]; p50,p99=lat(lambda q:f.search(q[None],k))
    print(f"faiss HNSWFlat ef64: build {bt:.1f}s recall {rec(found):.3f} p50 {p50:.2f} p99 {p99:.2f} ms",flush=True)
