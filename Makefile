# Two commands matter: `make serve` and `make test`.  Both build the virtualenv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Debian packages the test suite needs (a real browser for the page tests; Redis and nginx for the
# multi-worker deployment test).
TEST_DEBS := chromium chromium-driver redis-server nginx

.PHONY: install serve test bench system-deps clean default-model vanilla-baseline ssa-example default-kb grounded-data grounded-model grounded-q4

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: 2.13.0 is a CPU wheel on this machine kind; unpinned, pip fetches a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

# The service with the shipped model and an embedded Redis (data in $$CHATBOT_DATA or ~/.local/share/chatbot).
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 8080
serve: $(STAMP)
	@echo "chat service: open http://$(SERVE_HOST):$(SERVE_PORT)/ or run: $(BIN)/chatbot client http://$(SERVE_HOST):$(SERVE_PORT)"
	$(BIN)/chatbot serve --host $(SERVE_HOST) --port $(SERVE_PORT)

system-deps:
	@missing=""; for p in $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test: $(STAMP) system-deps
	CHATBOT_CACHE=$(CURDIR)/.cache/test $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .cache .pytest_cache

# Reproduces the shipped model (chatbot/assets/default) and its checkpoint ladder (runs/ship-et/snapshots,
# runs/ship-rag/snapshots), in three legs.  ship-et: a cosine to 2,400 steps, then resumed with --max-steps
# 5000 (the cosine restarts from where the longer schedule is, a warm restart), packed to runs/ship-et-model.
# ship-rag: that model trained on with SYNTHETIC knowledge-grounded examples as 20% of the mix and 3 passages
# in a 256-token source (docs/knowledge.md; GROUNDED_FLAGS below), a fresh cosine over SHIP_RAG_STEPS.  ship-et
# took 3.3 hours at 1 thread on an AVX2 CPU; ship-rag 70 minutes at 1 thread with native bf16
# (docs/benchmarks.md); on a GPU, minutes.  Each leg resumes where it stopped.
SHIP_LEGS := 2400 5000
SHIP_RAG_STEPS := 5600
TRAIN_FLAGS := --data chitchat --tokenizer chatbot/assets/default/tokenizer.json --batch-tokens 4096 \
               --max-steps 2400 --warmup-steps 400 --lr 1e-3 --eval-every 250 --valid-examples 1000 \
               --save-every 50 --snapshot-every 500 --seed 1234 --threads 1
default-model: $(STAMP) grounded-data
	for steps in $(SHIP_LEGS); do \
	  $(BIN)/chatbot train --preset default --out runs/ship-et $(TRAIN_FLAGS) --max-steps $$steps || exit 1; done
	$(BIN)/chatbot pack runs/ship-et runs/ship-et-model --fp16
	$(BIN)/chatbot train --out runs/ship-rag $(GROUNDED_FLAGS) --init-from runs/ship-et-model --max-steps $(SHIP_RAG_STEPS)
	$(BIN)/chatbot pack runs/ship-rag chatbot/assets/default --fp16

vanilla-baseline: $(STAMP)
	$(BIN)/chatbot train --preset default-vanilla --out runs/default-vanilla $(TRAIN_FLAGS)

# Re-embeds the default knowledge base's shipped vectors (retrieval/assets/wiki); minutes on 2 CPU cores.
default-kb: $(STAMP)
	$(BIN)/python -c "from retrieval.default_kb import write_seed; from retrieval.embedder import load_embedder; print(write_seed(load_embedder()))"

# The example SSA report in docs/ssa-example: the shipped model and every model directory in runs/ladder
# (checkpoints of one run; --tiny-steps N adds a tiny rung trained for seconds), rated by SIMULATED raters over the form's
# HTTP API, perplexities on the test split.  Minutes on 2 CPU cores; see docs/evaluation.md.
SSA_EXAMPLE_FLAGS ?= --n 30 --num-candidates 8 --tiny-steps 0 --ppl-max-examples 300
ssa-example: $(STAMP)
	$(BIN)/python -m eval.example --out docs/ssa-example --ladder runs/ladder $(SSA_EXAMPLE_FLAGS)

# Knowledge-grounded training (docs/knowledge.md, "Training the model to read passages").  grounded-data writes
# the SYNTHETIC conversations from the default knowledge base; grounded-model trains GROUNDED_INIT on with them as
# 20% of the mix, knowledge_passages=3 (the shipped model's third leg, above, is this recipe); grounded-q4 measures
# Q4 on the held-out articles and the shipping rule (chitchat test perplexity vs GROUNDED_INIT).  Runtimes at 1
# thread: docs/benchmarks.md.
GROUNDED_DATA ?= runs/grounded-data
GROUNDED_INIT ?= chatbot/assets/default
GROUNDED_OUT  ?= runs/grounded
GROUNDED_STEPS ?= 5600
GROUNDED_INDEX ?=
INDEX_FLAG := $(if $(GROUNDED_INDEX),--index $(GROUNDED_INDEX))
GROUNDED_FLAGS = --preset default --set knowledge_passages=3 --set max_source_len=256 \
                 --tokenizer chatbot/assets/default/tokenizer.json --data chitchat --grounded $(GROUNDED_DATA) \
                 --grounded-share 0.2 --batch-tokens 4096 --warmup-steps 200 --schedule cosine --lr 5e-4 \
                 --eval-every 400 --valid-examples 1000 --save-every 50 --snapshot-every 800 --seed 4321 --threads 1
grounded-data: $(STAMP)
	test -f $(GROUNDED_DATA)/train.jsonl || OMP_NUM_THREADS=1 $(BIN)/chatbot index training-data --out $(GROUNDED_DATA) $(INDEX_FLAG) --no-progress
grounded-model: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/chatbot train --out $(GROUNDED_OUT) $(GROUNDED_FLAGS) --init-from $(GROUNDED_INIT) \
	    --max-steps $(GROUNDED_STEPS)
	$(BIN)/chatbot pack $(GROUNDED_OUT) $(GROUNDED_OUT)-model --fp16
grounded-q4: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.bench_knowledge_quality --data $(GROUNDED_DATA) \
	    --model $(GROUNDED_OUT)-model --n 200 --threads 1 $(INDEX_FLAG) --chitchat-baseline $(GROUNDED_INIT) \
	    --out bench/results/bench_knowledge_quality.json
