# celery-broker-kit. Run as root on a Debian machine.
#   make deploy   toolchain + sandbox hosts + site.yml on inventories/sandbox
#   make test     lint + every Molecule scenario + sample_app tests, with a summary
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
APP_VENV := sample_app/.venv
BENCH_VENV := .cache/bench-venv
# promtool, from the Debian release's prometheus package, unpacked (not installed: no service).
PROMTOOL_DIR := .cache/promtool
PROMTOOL := $(PROMTOOL_DIR)/usr/bin/promtool
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

.PHONY: help toolchain host apt-cache sandbox deploy destroy lint ci-templates alert-rules role-docs molecule app-test test test-ha \
  bench-deploy bench audit matrix

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

$(APP_VENV)/.installed: sample_app/requirements.txt sample_app/requirements-test.txt
	python3 -m venv $(APP_VENV)
	$(APP_VENV)/bin/pip install -q -r sample_app/requirements.txt -r sample_app/requirements-test.txt
	touch $@

toolchain: $(VENV)/.installed ## controller venv with the pinned Ansible/Molecule toolchain

host: ## docker engine running and the Debian 12/13 base images built (idempotent)
	bash scripts/bootstrap-host.sh

apt-cache: toolchain host ## package cache shared by all test and sandbox hosts
	ansible-playbook playbooks/sandbox/apt_cache.yml

sandbox: apt-cache ## the sandbox hosts of inventories/sandbox as systemd containers
	ansible-playbook playbooks/sandbox/hosts.yml

deploy: sandbox ## deploy the whole stack on the sandbox and say where it is
	ansible-playbook site.yml
	ansible-playbook playbooks/sandbox/summary.yml

destroy: toolchain ## remove the sandbox hosts and network (images and caches stay)
	ansible-playbook playbooks/sandbox/destroy.yml

lint: toolchain ci-templates alert-rules ## yamllint, ansible-lint (production profile), role READMEs' variables tables up to date, changelog fragments, ci-templates, alert rules
	yamllint --strict .
	ansible-lint --profile production
	python scripts/role_docs.py --check
	antsibull-changelog lint

# The schemas ship inside check-jsonschema: validating needs no network.
ci-templates: toolchain ## ci-templates/ valid against GitHub's and GitLab's schemas, GitLab's scenario list complete
	check-jsonschema --builtin-schema vendor.github-workflows ci-templates/github-actions.yml
	check-jsonschema --builtin-schema vendor.gitlab-ci ci-templates/gitlab-ci.yml
	python scripts/ci_scenarios.py

$(PROMTOOL):
	mkdir -p $(PROMTOOL_DIR)
	cd $(PROMTOOL_DIR) && apt-get download -q prometheus 2>/dev/null && dpkg-deb -x prometheus_*.deb . && rm prometheus_*.deb

alert-rules: $(PROMTOOL) ## the monitoring role's alert rules: promtool check, then their unit tests
	$(PROMTOOL) check rules roles/monitoring/files/cbk-alerts.rules.yml
	cd roles/monitoring/tests && $(CURDIR)/$(PROMTOOL) test rules cbk-alerts.test.yml

role-docs: toolchain ## write each role README's variables table from its meta/argument_specs.yml
	python scripts/role_docs.py

molecule: apt-cache ## every Molecule scenario (SCENARIOS="a b" for a subset)
	bash scripts/run-tests.sh molecule $(SCENARIOS)

$(BENCH_VENV)/.installed: bench/requirements.txt
	python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q -r bench/requirements.txt
	touch $@

app-test: $(APP_VENV)/.installed ## sample_app's pytest suite
	cd sample_app && .venv/bin/pytest -q

test: apt-cache $(APP_VENV)/.installed ## lint + every Molecule scenario + sample_app tests, with a summary
	bash scripts/run-tests.sh all

test-ha: apt-cache $(APP_VENV)/.installed ## the HA scenarios: 3-node RabbitMQ cluster and Redis Sentinel, with failover under load
	bash scripts/run-tests.sh ha

bench-deploy: sandbox ## site.yml on new sandbox hosts, then warm re-runs: kit ansible.cfg, without Mitogen, empty: bench/deploy.md
	bash scripts/bench-deploy.sh

bench: toolchain $(BENCH_VENV)/.installed ## Celery tasks/s and latency on the sandbox, RabbitMQ and Redis; signups on each broker (switches and back): bench/results.md
	BENCH_PYTHON=$(BENCH_VENV)/bin/python bash scripts/bench.sh

audit: toolchain ## Lynis on a new host and on a sandbox host after make deploy (AUDIT_HOST, default cbk-web): bench/audit.md
	ansible-playbook playbooks/audit.yml -e audit_host=$${AUDIT_HOST:-cbk-web}

matrix: ## docs/broker-matrix.md from the e2e scenarios' last results (artifacts/) and bench/results.json
	python3 scripts/broker_matrix.py
