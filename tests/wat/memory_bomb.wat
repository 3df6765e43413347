;; Grows its memory by 1 MiB at a time until something stops it.
(module
  (memory (export "memory") 1)
  (func (export "warden_alloc") (param i32) (result i32) (i32.const 4096))
  (func (export "warden_evaluate") (param i32 i32) (result i64)
    (loop $more
      (drop (memory.grow (i32.const 16)))
      (br $more))
    (i64.const 0)))
