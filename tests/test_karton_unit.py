"""karton's own unit-test harness: a guarded consumer must not exit inside users' tests."""

from __future__ import annotations

from karton.core import Karton, Task
from karton.core.test import KartonTestCase

from memwatch import RestartBehavior, restart_when
from memwatch.karton import LoopGate


class Echo(Karton):
    """Echo each task back with one more header."""

    identity = "memwatch.test.echo"
    filters = [{"type": "echo"}]  # noqa: RUF012 (karton reads the class attribute)

    # exit_timeout=0: the test catches the exit, which must not end pytest later.
    @restart_when(max_tasks=1, behavior=RestartBehavior.EXIT_1, exit_timeout=0)
    def process(self, task: Task) -> None:
        self.send_task(Task({"type": "echoed", "n": task.headers["n"]}))


class EchoTestCase(KartonTestCase):
    karton_class = Echo  # type: ignore[assignment]

    def test_run_task_past_tripped_rule(self) -> None:
        for n in range(3):
            results = self.run_task(Task({"type": "echo", "n": n}))
            self.assertEqual(len(results), 1)
            self.assertEqual(results[0].headers["n"], n)
        # The rule tripped on the first task; the exit waits for a loop that
        # run_task never runs.
        self.assertIsInstance(self.karton.__dict__["_shutdown"], LoopGate)

    def test_loop_check_exits_after_trip(self) -> None:
        # Before any task the flag reads False, so karton's loop goes on.
        self.assertFalse(self.karton.shutdown)
        self.run_task(Task({"type": "echo", "n": 0}))
        # The check karton's loop makes before its next task carries out the exit.
        with self.assertRaises(SystemExit) as caught:
            bool(self.karton.shutdown)
        self.assertEqual(caught.exception.code, 1)
