"""`meshctl init`: the starter topology comes up as it is; `init --from` converts a compose file, mapping by
mapping, with a located warning for what it cannot keep; nothing is overwritten without --force."""

from __future__ import annotations

import json
import textwrap
import urllib.request
from pathlib import Path

import pytest

from meshctl.init.compose import Conversion, convert
from pods.topology import Topology, parse_topology
from tests.conftest import Meshctl, free_ports

STARTER_PORTS = ("A_PUBLISH_PORT", "A_PORT", "A_SERVICE_PORT", "A_EGRESS_PORT", "A_ADMIN_PORT", "B_PORT",
                 "B_METRICS_PORT")


def supervisor_events(meshctl: Meshctl, project: str) -> list[str]:
    """supervisor.log's events in order, without the time and level: `b-0/service ready`, ..."""
    lines = (meshctl.home / project / "supervisor.log").read_text().splitlines()
    return [line.split(" ", 3)[3] for line in lines if line.count(" ") >= 3]


def first(events: list[str], prefix: str) -> int:
    return next(i for i, event in enumerate(events) if event.startswith(prefix))


# --------------------------------------------------------------------------- the starter


def test_starter_validates_comes_up_and_retries(meshctl: Meshctl) -> None:
    target = meshctl.workdir / "My Project"
    res = meshctl("init", str(target))
    path = target / "meshctl.yaml"
    assert res.stdout.splitlines() == [
        f"wrote {path}: a starter mesh, pod a behind a sidecar that retries pod b",
        "next:",
        f"  meshctl up '{path}' -d",
        "  meshctl traffic a --n 100",
        "  meshctl down",
    ]
    assert "name: my-project\n" in path.read_text()  # the directory's name, as compose names a project
    assert "ok (mesh 'my-project', 2 pods, 2 replicas)" in meshctl("validate", str(path)).stdout

    env = dict(zip(STARTER_PORTS, map(str, free_ports(len(STARTER_PORTS))), strict=True))
    meshctl.up(path, "starter", env=env)
    with urllib.request.urlopen(f"http://127.0.0.1:{env['A_PUBLISH_PORT']}/", timeout=10) as r:
        assert r.read().startswith(b"Service A: upstream responded with: Service B: Yay!")
    # b fails 20 % of its requests; a's sidecar retries 5xx three times: 0.2**4 of the calls fail.
    report = json.loads(meshctl("traffic", "a", "--n", "200", "-p", "starter", "--json").stdout)
    assert report["requests"] == 200 and report["success_ratio"] >= 0.97, report
    b_calls = int(meshctl("logs", "b", "-p", "starter").stdout.count("GET / "))
    assert b_calls > 210, "b saw no retries"
    events = supervisor_events(meshctl, "starter")
    assert first(events, "b-0/service ready") < first(events, "a-0/sidecar started")  # depends_on: {b: ready}


# --------------------------------------------------------------------------- never overwrite


def test_init_never_overwrites_without_force(meshctl: Meshctl) -> None:
    existing = meshctl.write("meshctl.yaml", "# mine\n")
    compose = meshctl.write("compose.yaml", "services:\n  web: {command: sleep 1}\n")
    for args in (("init", str(meshctl.workdir)), ("init", "--from", str(compose), str(meshctl.workdir))):
        res = meshctl(*args, check=False)
        assert res.returncode == 2 and res.stdout == ""
        assert res.stderr == f"meshctl: {existing} already exists (--force overwrites it)\n"
        assert existing.read_text() == "# mine\n"
    meshctl("init", "--force", str(meshctl.workdir))
    assert "A starter mesh" in existing.read_text()
    meshctl("init", "--from", str(compose), "--force", str(meshctl.workdir))
    assert "web:" in existing.read_text()
    assert not [p.name for p in meshctl.workdir.iterdir() if p.name.endswith(".tmp")]  # written atomically


# --------------------------------------------------------------------------- compose, mapping by mapping


def convert_compose(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> tuple[Conversion, Topology]:
    """Convert ``text`` as tmp_path/compose.yaml for tmp_path/meshctl.yaml and load the result back."""
    conversion = convert(textwrap.dedent(text), "compose.yaml", tmp_path, tmp_path)
    assert not conversion.errors, conversion.errors
    return conversion, parse_topology(conversion.text, tmp_path / "meshctl.yaml", environ or {})


def warnings(conversion: Conversion) -> list[str]:
    return [str(w) for w in conversion.warnings]


def test_command_and_entrypoint(tmp_path: Path) -> None:
    _, topo = convert_compose(tmp_path, """\
        services:
          both:
            entrypoint: ["python", "-m"]
            command: http.server --bind '127.0.0.1' "8000"
          shell:
            command: sh -c 'echo "hi there" && sleep 1'
          entry:
            entrypoint: python -c "print(1)"
          listed:
            command: [sleep, 5]
        """)
    assert topo.pods["both"].service.command == ("python", "-m", "http.server", "--bind", "127.0.0.1", "8000")
    assert topo.pods["shell"].service.command == ("sh", "-c", 'echo "hi there" && sleep 1')
    assert topo.pods["entry"].service.command == ("python", "-c", "print(1)")
    assert topo.pods["listed"].service.command == ("sleep", "5")


def test_environment_both_forms(tmp_path: Path) -> None:
    conversion, topo = convert_compose(tmp_path, """\
        services:
          listed:
            command: env
            environment:
              - PLAIN=1
              - EMPTY=
              - WITH_EQUALS=a=b
              - FROM_SHELL
              - "bad.name=x"
          mapped:
            command: env
            environment:
              NUMBER: 8000
              FLAG: yes
              QUOTED: "no"
              OCTAL: 0755
              NONE:
              LITERAL: cost $$5
              TEXT: "two words"
        """, environ={})
    assert topo.pods["listed"].service.env == {"PLAIN": "1", "EMPTY": "", "WITH_EQUALS": "a=b"}
    # YAML 1.2 as compose reads it: yes and 0755 stay text; $$ is a literal $ in both.
    assert topo.pods["mapped"].service.env == {"NUMBER": "8000", "FLAG": "yes", "QUOTED": "no", "OCTAL": "0755",
                                               "LITERAL": "cost $5", "TEXT": "two words"}
    # A name without a value comes from the shell in compose: every process inherits `meshctl up`'s environment.
    assert "# FROM_SHELL: inherited from the environment of `meshctl up`" in conversion.text
    assert "# NONE: inherited from the environment of `meshctl up`" in conversion.text
    assert "compose.yaml:9: warning: services.listed.environment: 'bad.name' is not a variable name a process " \
           "can be given: left out" in warnings(conversion)


def test_interpolation_is_kept_as_written(tmp_path: Path) -> None:
    conversion, topo = convert_compose(tmp_path, """\
        services:
          web:
            command: python -m http.server ${WEB_PORT:-8000}
            environment:
              URL: http://db:${DB_PORT:-5432}/x
            ports: ["${PUBLISH:-8080}:${WEB_PORT:-8000}"]
        """, environ={"WEB_PORT": "9000"})
    assert "'${PUBLISH:-8080}:${WEB_PORT:-8000}'" in conversion.text and "${DB_PORT:-5432}" in conversion.text
    web = topo.pods["web"]
    assert web.service.command[-1] == "9000" and web.service.env["URL"] == "http://db:5432/x"
    assert [(p.host_port, p.pod_port) for p in web.publish] == [(8080, 9000)]


def test_ports_and_expose(tmp_path: Path) -> None:
    conversion, topo = convert_compose(tmp_path, """\
        services:
          web:
            command: sleep 1
            ports:
              - "8080:80"
              - 127.0.0.2:8081:81
              - "0.0.0.0:8082:82/tcp"
              - "9000"
              - 7000-7001:7100-7101
              - "53:53/udp"
              - 22:22
              - target: 443
                published: "8443"
                host_ip: 127.0.0.3
              - "6000-6001:60"
            expose: ["3000", "5432/tcp", 9000]
        """)
    web = topo.pods["web"]
    assert [(p.host_ip, p.host_port, p.pod_port) for p in web.publish] == [
        ("127.0.0.1", 8080, 80), ("127.0.0.2", 8081, 81), ("127.0.0.1", 8082, 82), ("127.0.0.1", 7000, 7100),
        ("127.0.0.1", 7001, 7101), ("127.0.0.1", 22, 22), ("127.0.0.3", 8443, 443)]
    assert [(p.port, p.protocol) for p in web.ports] == [(9000, "http"), (3000, "http"), (5432, "tcp")]
    assert warnings(conversion) == [
        "compose.yaml:7: warning: services.web.ports: '0.0.0.0:8082:82/tcp': published on 127.0.0.1 instead of "
        "0.0.0.0 (meshctl publishes on loopback only)",
        "compose.yaml:8: warning: services.web.ports: '9000' has no host side (compose would pick a random host "
        "port): not published; declared in the pod's ports for `meshctl export`",
        "compose.yaml:10: warning: services.web.ports: '53:53/udp': only tcp can be published: left out",
        "compose.yaml:15: warning: services.web.ports: '6000-6001:60': a host range must match the container "
        "range: left out",
    ]


def test_extra_hosts_both_forms(tmp_path: Path) -> None:
    conversion, topo = convert_compose(tmp_path, """\
        services:
          listed:
            command: sleep 1
            extra_hosts:
              - "somehost:162.242.195.82"
              - "v6host:::1"
              - "eq=10.0.0.1"
              - "host.docker.internal:host-gateway"
          mapped:
            command: sleep 1
            extra_hosts:
              other: 10.1.2.3
              back: listed
        """)
    assert dict(topo.pods["listed"].add_hosts) == {"somehost": "162.242.195.82", "v6host": "::1", "eq": "10.0.0.1",
                                                   "host.docker.internal": "127.0.0.1"}
    assert dict(topo.pods["mapped"].add_hosts) == {"other": "10.1.2.3", "back": "listed"}
    assert warnings(conversion) == [
        "compose.yaml:8: warning: services.listed.extra_hosts: host.docker.internal -> host-gateway is 127.0.0.1 "
        "(the host is on loopback here; a program listening on 0.0.0.0 or 127.0.0.1 is reachable there)"]


def test_depends_on_conditions(tmp_path: Path) -> None:
    conversion, topo = convert_compose(tmp_path, """\
        services:
          web:
            command: sleep 1
            depends_on:
              db: {condition: service_healthy}
              migrate: {condition: service_completed_successfully, restart: true}
              cache: {condition: service_started, required: false}
              redis: {condition: service_healthy}
          worker:
            command: sleep 1
            depends_on: [db, cache, ghost]
          db: {command: sleep 1}
          migrate: {command: sleep 1}
          cache: {command: sleep 1, restart: always}
          redis: {image: "redis:7"}
        """)
    deps = {name: [(d.pod, d.condition) for d in pod.depends_on] for name, pod in topo.pods.items()}
    assert deps["web"] == [("db", "ready"), ("migrate", "completed"), ("cache", "started")]
    assert deps["worker"] == [("db", "started"), ("cache", "started")]
    assert "depends_on: [db, cache]" in conversion.text
    assert "    # TODO: depends_on redis: ready once redis is a pod" in conversion.text  # redis has no command
    assert warnings(conversion) == [
        "compose.yaml:6: warning: services.web.depends_on.migrate.restart: true is not kept (a pod is not "
        "restarted when its dependency is)",
        "compose.yaml:7: warning: services.web.depends_on.cache.required: false is not kept (meshctl waits for "
        "every dependency)",
        "compose.yaml:11: warning: services.worker.depends_on: no service named 'ghost': left out",
        "compose.yaml:15: warning: services.redis only names the image redis:7: meshctl runs programs, not images; "
        "written commented out with a TODO (give pod 'redis' a command)",
    ]


def test_healthcheck_becomes_an_exec_probe(tmp_path: Path) -> None:
    conversion, topo = convert_compose(tmp_path, """\
        services:
          cmd:
            command: sleep 1
            healthcheck:
              test: ["CMD", "pg_isready", "-U", "postgres"]
              interval: 5s
              timeout: 3s
              retries: 5
          shell:
            command: sleep 1
            healthcheck:
              test: ["CMD-SHELL", "curl -f http://localhost/ || exit 1"]
          string:
            command: sleep 1
            healthcheck: {test: "test -f /tmp/ready"}
          none:
            command: sleep 1
            healthcheck: {test: [NONE]}
          disabled:
            command: sleep 1
            healthcheck: {test: [CMD, "true"], disable: true}
        """)
    probes = {name: pod.service.ready and pod.service.ready.command for name, pod in topo.pods.items()}
    assert probes == {"cmd": ("pg_isready", "-U", "postgres"), "shell": ("sh", "-c", "curl -f http://localhost/ || "
                      "exit 1"), "string": ("sh", "-c", "test -f /tmp/ready"), "none": None, "disabled": None}
    assert warnings(conversion) == [
        "compose.yaml:4: warning: services.cmd.healthcheck: interval, timeout, retries not kept (meshctl probes "
        "every 50-250 ms until ready, then every 2 s)"]


def test_restart_workdir_grace_replicas_image(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    conversion, topo = convert_compose(tmp_path, """\
        services:
          default: {command: sleep 1}
          unquoted: {command: sleep 1, restart: no}
          quoted: {command: sleep 1, restart: "no"}
          always: {command: sleep 1, restart: always}
          limited: {command: sleep 1, restart: "on-failure:3"}
          unless: {command: sleep 1, restart: unless-stopped}
          app:
            image: shop/app:1.2
            command: sleep 1
            working_dir: /app/sub
            volumes: ["./src:/app"]
            stop_grace_period: 1m30s
            deploy:
              replicas: 3
              restart_policy: {condition: on-failure}
          scaled: {command: sleep 1, scale: 2, working_dir: .}
          long:
            command: sleep 1
            working_dir: /srv
            volumes: [{type: bind, source: ./src, target: /srv}]
        """)
    restart = {name: pod.service.restart for name, pod in topo.pods.items()}
    assert restart == {"default": "never", "unquoted": "never", "quoted": "never", "always": "always",
                       "limited": "on-failure", "unless": "always", "app": "on-failure", "scaled": "never",
                       "long": "never"}
    app = topo.pods["app"]
    # The working_dir is in a bind mount: the host directory it shows.
    assert app.service.workdir == tmp_path / "src" / "sub" and app.service.stop_grace_s == 90.0
    assert app.replicas == 3 and app.image == "shop/app:1.2"
    assert topo.pods["scaled"].replicas == 2 and topo.pods["scaled"].service.workdir == tmp_path
    assert topo.pods["long"].service.workdir == tmp_path / "src"
    assert "compose.yaml:6: warning: services.limited.restart: the limit of 3 restarts is not kept (meshctl backs " \
           "off up to 10 s between restarts, without a limit)" in warnings(conversion)


def test_container_working_dir_is_kept_with_a_warning(tmp_path: Path) -> None:
    conversion, topo = convert_compose(tmp_path, """\
        services:
          app: {command: sleep 1, working_dir: /nonexistent/app}
        """)
    assert topo.pods["app"].service.workdir == Path("/nonexistent/app")
    assert warnings(conversion) == [
        "compose.yaml:2: warning: services.app.working_dir: /nonexistent/app is a path in the container and does "
        "not exist here: set workdir to the host directory the program runs in"]


def test_names_become_dns_labels_and_references_follow(tmp_path: Path) -> None:
    conversion, topo = convert_compose(tmp_path, """\
        services:
          Web_App:
            command: sleep 1
            depends_on: [my_db]
            links: ["my_db:database"]
          my_db:
            command: sleep 1
            extra_hosts: {app: Web_App}
          web-app:
            command: sleep 1
        """)
    assert list(topo.pods) == ["web-app-2", "my-db", "web-app"]  # web-app keeps its name
    assert [d.pod for d in topo.pods["web-app-2"].depends_on] == ["my-db"]
    # links: the alias resolves to the pod; the old names resolve in every pod, unless only their case differs
    # from a pod's name (host names are case-insensitive).
    assert dict(topo.pods["web-app-2"].add_hosts) == {"database": "my-db", "Web_App": "web-app-2", "my_db": "my-db"}
    assert dict(topo.pods["my-db"].add_hosts) == {"app": "web-app-2", "Web_App": "web-app-2", "my_db": "my-db"}
    assert "  web-app-2:  # compose service 'Web_App'" in conversion.text
    assert warnings(conversion) == [
        "compose.yaml:2: warning: services.Web_App: renamed to pod 'web-app-2' (pod names are DNS labels: lowercase "
        "letters, digits and '-'); every pod still resolves 'Web_App' to it",
        "compose.yaml:6: warning: services.my_db: renamed to pod 'my-db' (pod names are DNS labels: lowercase "
        "letters, digits and '-'); every pod still resolves 'my_db' to it",
    ]


def test_ignored_keys_warn_at_their_line_and_image_only_services_are_todo(tmp_path: Path) -> None:
    conversion, topo = convert_compose(tmp_path, """\
        name: My Shop
        version: "3.9"
        x-defaults: &defaults
          logging: {driver: json-file}
        services:
          web:
            <<: *defaults
            build: .
            command: sleep 1
            volumes: [data:/data]
            networks: [front]
            env_file: .env
            user: "1000"
            cap_add: [NET_ADMIN]
          db:
            image: postgres:16
            environment: {POSTGRES_PASSWORD: example}
            ports: ["5432:5432"]
        networks:
          front: {}
        volumes:
          data: {}
        """)
    assert topo.name == "my-shop" and list(topo.pods) == ["web"]
    assert conversion.pods == ["web"] and conversion.todo == ["db"]
    lines = [w.split(": warning: ")[0] + ": " + w.split(": warning: ")[1].split(" ")[0] for w in warnings(conversion)]
    assert lines == [
        "compose.yaml:4: services.web.logging:",  # merged from the x- anchor: its line there
        "compose.yaml:8: services.web.build:",
        "compose.yaml:10: services.web.volumes:",
        "compose.yaml:11: services.web.networks:",
        "compose.yaml:12: services.web.env_file:",
        "compose.yaml:13: services.web.user:",
        "compose.yaml:14: services.web.cap_add:",
        "compose.yaml:15: services.db",
        "compose.yaml:19: networks:",
        "compose.yaml:21: volumes:",
    ]
    assert ("compose.yaml:12: warning: services.web.env_file: ignored (not read, so its values are not copied "
            "into the topology; every process inherits the environment of `meshctl up` (set -a; . ./.env; set +a), "
            "or copy them into env)") in warnings(conversion)
    # Keys merged in from an anchor come after the service's own.
    assert "    # not converted (see the warnings of `meshctl init`): build, volumes, networks, env_file, user, " \
           "cap_add, logging" in conversion.text
    # The image-only service is there to finish by hand, commented out, with what compose said about it.
    assert "  # TODO: db has no command: meshctl runs programs, not images." in conversion.text
    assert "  #   image: 'postgres:16'\n  #   publish: ['5432:5432']\n  #   service:\n  #     command: TODO\n" \
           in conversion.text


def test_bad_compose_files_are_errors(tmp_path: Path) -> None:
    for text, message in [("", "compose.yaml:1: the compose file is empty"),
                          ("services: [a, b]\n", "compose.yaml:1: not a compose file: no 'services' mapping at top "
                                                 "level"),
                          ("services:\n  a: {command: [x\n", "compose.yaml:3: YAML syntax error")]:
        conversion = convert(text, "compose.yaml", tmp_path, tmp_path)
        assert conversion.text == "" and str(conversion.errors[0]).startswith(message), conversion.errors


def test_init_from_cli_prints_warnings_and_the_next_steps(meshctl: Meshctl) -> None:
    compose = meshctl.write("compose.yaml", """\
        services:
          web:
            command: python -m http.server 8000
            volumes: [".:/srv"]
          cache:
            image: redis:7
        """)
    out = meshctl.workdir / "out"
    res = meshctl("init", "--from", str(compose), str(out))
    assert res.stderr.splitlines() == [
        f"{compose}:4: warning: services.web.volumes: ignored (processes use the host's files: point paths in the "
        "command and env at host directories)",
        f"{compose}:5: warning: services.cache only names the image redis:7: meshctl runs programs, not images; "
        "written commented out with a TODO (give pod 'cache' a command)",
    ]
    path = out / "meshctl.yaml"
    assert res.stdout.splitlines() == [
        f"wrote {path} from {compose}: pods web",
        "  TODO in the file: cache (no command: give each one)",
        "next:",
        f"  meshctl validate {path}",
        f"  meshctl up {path} -d",
    ]
    assert "ok (mesh " in meshctl("validate", str(path)).stdout
    res = meshctl("init", "--from", str(meshctl.workdir / "missing.yaml"), str(out), check=False)
    assert res.returncode == 2 and "does not exist" in res.stderr


# --------------------------------------------------------------------------- a converted file comes up in order


@pytest.mark.timeout(180)
def test_converted_compose_file_comes_up_in_dependency_order(meshctl: Meshctl) -> None:
    """db is healthy once its port answers (a CMD healthcheck); migrate, a one-shot job, needs db healthy;
    web needs migrate completed. The supervisor's events show that order; redis (image only) is a TODO."""
    db_port, web_port, publish = free_ports(3)
    check = "import os, socket; socket.create_connection((os.environ['POD_IP'], int(os.environ['DB_PORT'])), 2)"
    compose = meshctl.write("compose.yaml", f"""\
        services:
          web:
            command: ["python", "-m", "http.server", "{web_port}", "--bind", "0.0.0.0"]
            ports: ["${{WEB_PUBLISH:-8080}}:{web_port}"]
            depends_on:
              db: {{condition: service_healthy}}
              migrate: {{condition: service_completed_successfully}}
              redis: {{condition: service_started}}
            restart: unless-stopped
          migrate:
            entrypoint: sh -c
            command: ["sleep 0.3; echo migrated"]
            depends_on:
              db: {{condition: service_healthy}}
          db:
            command: python -m http.server ${{DB_PORT:-5432}} --bind 127.0.0.1
            environment:
              - DB_PORT=${{DB_PORT:-5432}}
            healthcheck:
              test: ["CMD", "python", "-c", "{check}"]
              interval: 1s
            restart: always
          redis:
            image: redis:7
        """)
    meshctl("init", "--from", str(compose), str(meshctl.workdir))
    topology = meshctl.workdir / "meshctl.yaml"
    res = meshctl.up(topology, "fromcompose", env={"DB_PORT": str(db_port), "WEB_PUBLISH": str(publish)})
    assert "migrate-0" in res.stdout
    events = supervisor_events(meshctl, "fromcompose")
    assert first(events, "db-0/service ready") < first(events, "migrate-0/service started")
    assert first(events, "migrate-0/service exited") < first(events, "web-0/service started")
    procs = {p["pod"]: p for p in meshctl.ps("fromcompose")["processes"]}
    assert set(procs) == {"web", "migrate", "db"}
    assert procs["migrate"]["state"] == "exited" and procs["migrate"]["last_exit"] == 0
    assert procs["web"]["ready"] and procs["db"]["ready"]
    assert "migrated" in meshctl("logs", "migrate", "-p", "fromcompose").stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{publish}/", timeout=10) as r:
        assert r.status == 200
