"""benchmarks/thread_samples.py: pool threads classified from gdb backtraces."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import thread_samples  # noqa: E402

GDB = """
Thread 21 (Thread 0x7f (LWP 3470) "tf_XLAEigen"):
#0  0x00007f in ynn::dot_fp32_6x16x1_1x8x1_fma3(unsigned long, ...) () from /x/libjax_common.so
#1  0x00007f in ynn::(anonymous namespace)::f() () from /x/libjax_common.so
#2  0x00007f in xla::cpu::SlinkyThreadPool::Impl::WorkOnTask(...) () from /x/libjax_common.so

Thread 20 (Thread 0x7f (LWP 3469) "tf_XLAEigen"):
#0  0x00007f in __futex_abstimed_wait_common64 (...) at ./nptl/futex-internal.c:57
#1  0x00007f in std::condition_variable::wait(std::unique_lock<std::mutex>&) () from /x/libstdc++.so.6
#2  0x00007f in Eigen::EventCount::CommitWait(Eigen::EventCount::Waiter*) () from /x/libjax_common.so
#3  0x00007f in Eigen::ThreadPoolTempl<tsl::thread::EigenEnvironment>::WaitForWork(...) () from /x/libjax_common.so

Thread 1 (Thread 0x7f (LWP 3454) "python"):
#0  syscall () at ../sysdeps/unix/sysv/linux/x86_64/syscall.S:38
#1  0x00007f in Eigen::ThreadPoolTempl<tsl::thread::EigenEnvironment>::WaitForWork(...) ()
"""


def test_pool_threads_are_classified_and_other_threads_ignored():
    assert thread_samples.pool_thread_states(GDB) == ["matmul", "asleep"]


def test_each_state_from_its_frames():
    classify = thread_samples.classify
    assert classify("#0 xla::cpu::SlinkyThreadPool::Impl::Await(...)\n#1 ynn::dot_fp32") == "matmul wait"
    assert classify("#0 ynn::transpose_x32_avx2\n#1 ynn::packer::pack") == "matmul"
    assert classify("#0 add_tanh_fusion ()\n#1 xla::cpu::Kernel::Launch") == "other thunk"
    assert classify("#0 ynn::sum_squared_k1_fp32_avx ()") == "other thunk"
    assert classify("#0 __memcpy_avx_unaligned_erms\n#1 xla::cpu::CopyThunk::Execute") == "other thunk"
    assert classify("#0 Eigen::ThreadPoolTempl<E>::GlobalSteal()\n#1 MaybeGetTask") == "scheduling"
    assert classify("#0 0x00007f in ?? ()") == "unknown"


def test_a_lone_matmul_is_one_thread_in_a_matmul_and_the_other_idle():
    summary = thread_samples.summarise([["matmul", "asleep"], ["matmul wait", "matmul"], ["matmul", "matmul"],
                                        ["matmul", "other thunk"]])
    assert summary["snapshots"] == 4 and summary["threads"] == 8
    assert summary["matmul_alone"] == 0.5
    assert summary["matmul_both"] == 0.25
    assert summary["shares"]["matmul"] == 5 / 8
    assert sum(summary["shares"].values()) == 1.0


def test_a_thread_computing_inside_wait_for_is_in_a_matmul_not_waiting():
    stack = ("#0 ynn::dot_fp32_6x16x1_1x8x1_fma3 ()\n#1 xla::cpu::SlinkyThreadPool::Impl::WorkOnTask(Task*) ()\n"
             "#2 xla::cpu::SlinkyThreadPool::wait_for(slinky::thread_pool::task*) ()")
    assert thread_samples.classify(stack) == "matmul"
