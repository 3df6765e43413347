;; Answers with bytes that are not a decision.
(module
  (memory (export "memory") 1)
  (data (i32.const 1024) "certainly! here is my decision: yes")
  (func (export "warden_alloc") (param i32) (result i32) (i32.const 4096))
  (func (export "warden_evaluate") (param i32 i32) (result i64)
    (i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.const 35))))
