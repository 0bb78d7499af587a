# paseo-relay: the two commands of the README, plus what they need.
#   make run   - install build needs if missing, build release, run on 0.0.0.0:8080 (plain ws)
#   make test  - the same set-up, then every test (unit, integration, doc) and a config check

CARGO  ?= cargo
LISTEN ?= 0.0.0.0:8080
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test deps build check-conf

# pingora-core builds zlib-ng with cmake; rustls needs nothing else.
deps:
	@command -v $(CARGO) >/dev/null 2>&1 || { echo "cargo not found: install Rust from https://rustup.rs"; exit 1; }
	@command -v cmake >/dev/null 2>&1 || { \
		echo "installing cmake (build dependency of pingora-core)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq cmake; }

build: deps
	$(CARGO) build --release -p proxy-bin

run: build
	./target/release/paseo-relay --listen $(LISTEN)

test: deps
	$(CARGO) test --workspace
	$(MAKE) --no-print-directory check-conf

# Every shipped configuration must pass the binary's own validation (-t).
check-conf:
	$(CARGO) build -q -p proxy-bin
	@for f in conf/*.yaml; do \
		./target/debug/paseo-relay -t -c "$$f" --log-level warn || { echo "invalid config: $$f"; exit 1; }; \
		echo "config ok: $$f"; \
	done
